"""Where the trainer runs: the rankers on LearnerConfig.device (CUDA when torch sees a GPU), the
per-user table on the CPU, checkpoints that load on either. CI has no GPU: the CUDA test runs only
where one is present; the others check the choice of device and the plumbing on the CPU."""
import pytest
import torch

from tests.trainer_fixtures import joined_frame, small_config
from trainer.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint
from trainer.errors import TrainerError
from trainer.featurizer import Featurizer
from trainer.learner import Learner, LearnerConfig, trainer_device


@pytest.fixture(scope="module")
def batch():
    cfg = small_config()
    b, _ = Featurizer.for_config(cfg, None)(joined_frame(64).sort_values("event_time", kind="stable"))
    return b


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_an_error_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer_device("auto") == torch.device("cpu")
    assert trainer_device("cpu") == torch.device("cpu")
    with pytest.raises(TrainerError, match="--device cpu"):
        trainer_device("cuda")
    with pytest.raises(TrainerError, match="TRM_TRAINER_DEVICE"):
        Learner(["trm"], small_config(), LearnerConfig(device="cuda:0"))


def test_the_environment_sets_the_default_device(monkeypatch):
    monkeypatch.setenv("TRM_TRAINER_DEVICE", "cpu")
    assert LearnerConfig().device == "cpu"
    monkeypatch.delenv("TRM_TRAINER_DEVICE")
    assert LearnerConfig().device == "auto"


def test_batch_to_moves_every_input_and_keeps_the_absent_ones_absent(batch):
    view = batch.select(("gen", "stats"))
    moved = view.to("cpu")
    assert moved.mem is None and moved.item_id is None
    assert torch.equal(moved.gen, view.gen) and moved.stats.dtype == view.stats.dtype


def _train_and_score(device: str, batch) -> tuple[Learner, dict]:
    lr = Learner(["trm", "id"], small_config(), LearnerConfig(seed=0, device=device))
    lr.fit_linear(batch)
    lr.train(batch)
    return lr, lr.predict_then_learn_users(batch)


def test_the_table_stays_on_the_cpu_and_an_explicit_cpu_run_equals_auto_here(batch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a, pa = _train_and_score("cpu", batch)
    b, pb = _train_and_score("auto", batch)
    for n in a.names:
        assert a.models[n].user_weights.w.device.type == "cpu"
        assert (pa[n] == pb[n]).all()
    assert set(rng_state()) == {"torch"}  # no CUDA generator to save without a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_on_a_gpu_the_rankers_train_there_and_the_checkpoint_loads_on_the_cpu(batch, tmp_path):
    gpu, p_gpu = _train_and_score("cuda", batch)
    cpu, p_cpu = _train_and_score("cpu", batch)
    for n in gpu.names:
        m = gpu.models[n]
        assert next(m.backbone.parameters()).device.type == "cuda"
        assert m.user_weights.w.device.type == "cpu"
        assert abs(float(p_gpu[n].mean()) - float(p_cpu[n].mean())) < 0.05  # same model, other arithmetic
    path = save_checkpoint(tmp_path, gpu.models, gpu.optimizers, TrainState(step=1))
    assert "cuda" in rng_state()
    fresh = Learner(["trm", "id"], small_config(), LearnerConfig(seed=0, device="cpu"))
    load_checkpoint(path, fresh.models, fresh.optimizers)
    for n in gpu.names:
        want = gpu.models[n].eval().wide_dense.weight.detach().cpu()
        assert torch.equal(fresh.models[n].wide_dense.weight.detach(), want)
        fresh.train(batch)  # the optimizer's moments moved to the CPU with the weights


def test_a_checkpoint_resumes_bit_identically(batch, tmp_path):
    a = Learner(["trm"], small_config(), LearnerConfig(seed=0, device="cpu"))
    a.train(batch)
    path = save_checkpoint(tmp_path, a.models, a.optimizers, TrainState(step=1))
    b = Learner(["trm"], small_config(), LearnerConfig(seed=1, device="cpu"))
    load_checkpoint(path, b.models, b.optimizers)  # also sets the global RNG to the saved one
    a.train(batch)
    load_checkpoint(path, {}, {})  # the RNG once more: one process, one global generator
    b.train(batch)
    for (k, pa), (_, pb) in zip(a.models["trm"].state_dict().items(), b.models["trm"].state_dict().items()):
        assert torch.equal(pa, pb), k
