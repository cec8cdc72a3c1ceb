"""Checkpoints: bit-identical resume, tamper detection, and a LATEST pointer that never dangles."""
import json

import pytest
import torch

from tests.trainer_fixtures import featurizer, joined_frame, small_config
from trainer.checkpoint import (
    CheckpointError,
    ModelPublisher,
    TrainState,
    load_checkpoint,
    load_latest,
    read_pointer,
    save_checkpoint,
    verify,
)
from trainer.learner import Learner, LearnerConfig

NAMES = ["trm", "id", "gen_only", "two_gram", "prefix_ngram"]


def batches(n):
    cfg = small_config()
    f = featurizer(cfg)
    return cfg, [f(joined_frame(64, seed=s))[0] for s in range(n)]


def params(learner):
    return {f"{n}.{k}": v.detach().clone() for n, m in learner.models.items() for k, v in m.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    cfg, bs = batches(6)
    lc = LearnerConfig(minibatch=32)
    straight = Learner(NAMES, cfg, lc)
    for b in bs:
        straight.train(b)

    first = Learner(NAMES, cfg, lc)
    for b in bs[:3]:
        first.train(b)
    save_checkpoint(tmp_path, first.models, first.optimizers, TrainState(step=3, offsets={"t:0": 192}))
    torch.manual_seed(999)  # a new process: different RNG until the checkpoint restores it
    resumed = Learner(NAMES, cfg, LearnerConfig(minibatch=32, seed=7))
    st = load_latest(tmp_path, resumed.models, resumed.optimizers)
    assert st.step == 3 and st.offsets == {"t:0": 192}
    losses = [resumed.train(b) for b in bs[3:]]
    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert all(v["bce"] > 0 for v in losses[-1].values())


def test_tampered_checkpoint_is_rejected(tmp_path):
    cfg, _ = batches(0)
    lr = Learner(["trm"], cfg)
    path = save_checkpoint(tmp_path, lr.models, lr.optimizers, TrainState(step=1))
    verify(path)
    f = path / "model.trm.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, lr.models, lr.optimizers)

    path2 = save_checkpoint(tmp_path, lr.models, lr.optimizers, TrainState(step=2))
    st = json.loads((path2 / "state.json").read_text())
    st["offsets"] = {"t:0": 10**9}  # skip ahead: must not go unnoticed
    (path2 / "state.json").write_text(json.dumps(st))
    with pytest.raises(CheckpointError, match="modified"):
        load_latest(tmp_path, lr.models)

    path3 = save_checkpoint(tmp_path, lr.models, lr.optimizers, TrainState(step=3))
    (path3 / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="differ from the manifest"):
        verify(path3)
    (path3 / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify(path3)


def test_checkpoint_must_fit_the_models(tmp_path):
    cfg, _ = batches(0)
    lr = Learner(["gen_only"], cfg)
    path = save_checkpoint(tmp_path, lr.models, lr.optimizers, TrainState(step=1))
    other = Learner(["gen_only"], small_config(d_model=64))
    with pytest.raises(Exception):
        load_checkpoint(path, other.models)
    with pytest.raises(CheckpointError, match="no model"):
        load_checkpoint(path, Learner(["trm"], cfg).models)


def test_pointer_ignores_partial_writes_and_publisher_versions(tmp_path):
    cfg, _ = batches(0)
    lr = Learner(["gen_only"], cfg)
    ck = tmp_path / "ckpt"
    p1 = save_checkpoint(ck, lr.models, lr.optimizers, TrainState(step=1))
    (ck / ".tmp-ckpt-crashed").mkdir()  # what a crash mid-save leaves behind
    (ck / ".tmp-ckpt-crashed" / "model.gen_only.safetensors").write_bytes(b"partial")
    assert read_pointer(ck) == p1
    assert load_latest(ck, lr.models).step == 1

    pub = ModelPublisher(tmp_path / "models", every=2)
    assert pub.maybe_publish(p1, 1) is None
    p2 = save_checkpoint(ck, lr.models, lr.optimizers, TrainState(step=2))
    v2 = pub.maybe_publish(p2, 2)
    assert v2.name == "v2" and read_pointer(tmp_path / "models") == v2
    verify(v2)  # a published version is complete and self-verifying
    assert not any(f.name.startswith("optim.") for f in v2.iterdir())
    p4 = save_checkpoint(ck, lr.models, lr.optimizers, TrainState(step=4))
    assert ModelPublisher(tmp_path / "models", every=2).maybe_publish(p4, 3) is None  # restart remembers v2
    assert pub.maybe_publish(p4, 4).name == "v4"
    assert read_pointer(tmp_path / "models").name == "v4"
    assert len(list(ck.glob("ckpt-*"))) == 3  # older checkpoints pruned


def test_unreadable_manifest_and_published_digests(tmp_path):
    """A truncated manifest is a CheckpointError; a published version keeps the checkpoint's digests."""
    cfg, _ = batches(0)
    lr = Learner(["gen_only"], cfg)
    path = save_checkpoint(tmp_path / "ckpt", lr.models, lr.optimizers, TrainState(step=1))
    ck_manifest = verify(path)
    v1 = ModelPublisher(tmp_path / "models", every=1).publish(path, 1)
    assert verify(v1)["files"] == {k: d for k, d in ck_manifest["files"].items() if not k.startswith("optim.")}
    (path / "manifest.json").write_text('{"files": {')
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON .*: tampered or truncated"):
        verify(path)
