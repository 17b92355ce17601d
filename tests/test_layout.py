"""The house's shape, checked by parsing the imports: library modules never import a
script, scripts never import each other, and there are no import cycles. Every module
counts, its imports inside functions included."""

import ast
import os

from conftest import REPO

LIBRARY = {"common", "dist", "runs", "defaults", "np_encoder", "data", "bayes", "text", "world", "toy", "reward",
           "particles", "policy", "queries", "dialogue", "steer_eval", "policy_eval", "report"}
SCRIPTS = {"train_reward", "train_policy", "evaluate", "bench", "steer",
           "prepare.synthetic", "prepare.ultrafeedback", "prepare.embed", "prepare.steer_world"}
METHOD_PATH = ("np_encoder.py", "reward.py", "policy.py", "train_reward.py", "train_policy.py")


def module_files():
    """{module name: path} of every Python file of the project (tests excepted)."""
    files = {name[:-3]: os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith(".py")}
    for name in os.listdir(os.path.join(REPO, "prepare")):
        if name.endswith(".py"):
            files[f"prepare.{name[:-3]}"] = os.path.join(REPO, "prepare", name)
    return files


def project_imports(path, modules):
    """The project modules that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def import_graph():
    files = module_files()
    return {name: project_imports(path, files) - {name} for name, path in files.items()}


def test_every_module_is_a_library_module_or_a_script():
    assert set(module_files()) == LIBRARY | SCRIPTS, "classify a new file here (and in the README's map)"


def test_no_library_module_imports_a_script_and_no_script_imports_another():
    graph = import_graph()
    wrong = {name: sorted(imports & SCRIPTS) for name, imports in graph.items() if imports & SCRIPTS}
    assert wrong == {}


def test_there_are_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(name, path):
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                cycles.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child, path + [child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checker_sees_a_cycle_and_a_script_import(monkeypatch):
    """The checks above can fail: a made-up graph with a cycle and a library -> script edge."""
    real = import_graph()
    fake = dict(real, data=real["data"] | {"reward"}, reward=real["reward"] | {"data", "train_reward"})
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    import pytest
    with pytest.raises(AssertionError):
        test_there_are_no_import_cycles()
    with pytest.raises(AssertionError):
        test_no_library_module_imports_a_script_and_no_script_imports_another()


def line_count(path):
    with open(path) as f:
        return sum(1 for _ in f)


def test_files_stay_short_and_the_method_path_reads_in_an_afternoon():
    long_files = {name: line_count(path) for name, path in module_files().items() if line_count(path) > 500}
    assert long_files == {}
    assert sum(line_count(os.path.join(REPO, name)) for name in METHOD_PATH) <= 1500


def test_configs_hold_only_what_differs_from_the_defaults():
    import glob

    import yaml

    from common import flatten, load_config
    from defaults import POLICY_RUN, REWARD_RUN

    bench_keys = ("bench.",)  # bench.py's own section, beside a policy config
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        written = flatten(yaml.safe_load(open(path)))
        defaults = POLICY_RUN if written.get("stage") == "policy" else REWARD_RUN
        if not any(k.startswith(bench_keys) for k in written):
            load_config(defaults, [path])  # every key is known and well typed
        flat = flatten(defaults)
        repeated = [k for k, v in written.items() if k != "stage" and k in flat and flat[k] == v]
        assert repeated == [], f"{os.path.basename(path)} repeats defaults: {repeated}"
