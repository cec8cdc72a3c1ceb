"""The layering the code lives in (README "Layout"), checked on the import graph itself.

    tokenizer/  <-  streams/  <-  trainer/  <-  trm/ (the `trm` command and the demo)
                         ^-- deploy/

Every arrow points down: a layer imports only layers below it, and `trm/` (the front door) is
imported by nobody. `tokenizer/` imports nothing of the project's other packages. Read from the
source with `ast`, so a lazy import inside a function counts as much as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tokenizer", "streams", "trainer", "trm", "deploy")
# what each layer may import of the project (besides itself)
ALLOWED = {
    "tokenizer": set(),
    "streams": {"tokenizer"},
    "trainer": {"tokenizer", "streams"},
    "deploy": {"streams"},
    "trm": {"tokenizer", "streams", "trainer"},
}


def _project_imports(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every absolute import in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".", 1)[0]
            if top in PACKAGES:
                found.add((top, node.lineno))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for top, line in _project_imports(path):
            if top != layer and top not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not wrong, f"{layer}/ may import only {sorted(ALLOWED[layer]) or 'nothing of the project'}:\n" + \
        "\n".join(wrong)


def test_the_trainer_does_not_know_faust():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "trainer").rglob("*.py") if "faust" in p.read_text()]
    assert not users, f"the trainer reads Kafka with aiokafka; Faust belongs to the workers: {users}"


def test_topics_are_created_in_one_place():
    """One `create_topics` builds the admin client: development topics get the production configs."""
    makers = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
              if "KafkaAdminClient(" in p.read_text()]
    assert makers == ["streams/contract/topics.py"], makers


def test_embedded_and_production_topics_share_names_and_configs():
    from streams.contract.topics import EMBEDDED, PRODUCTION, TOPICS, topic_plan

    assert set(topic_plan(EMBEDDED)) == set(topic_plan(PRODUCTION)) == set(TOPICS)
    assert TOPICS["item_tokens"].configs == {"cleanup.policy": "compact"}


def test_worker_groups_are_named_and_found_in_one_place():
    from streams.contract.topics import WorkerGroups

    g = WorkerGroups("app-7")
    assert (g.items, g.interactions, g.item_stats) == ("app-7-items", "app-7-interactions", "app-7-item-stats")
    assert WorkerGroups.of_interactions_group(g.interactions) == g
    assert WorkerGroups.of_interactions_group("my-trainer") is None
