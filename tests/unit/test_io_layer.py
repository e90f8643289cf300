"""Every user path goes through lmjax.storage: read from the package's source, no module but
the layer itself calls `open`, `os.makedirs`, `os.listdir`, `os.path.exists/isdir/isfile/
getsize`, `glob.glob`, `pathlib.Path` or `tf.io.gfile` (which would turn gs://b/x into a local
./gs:/b/x, or reach a GCS that STORAGE_EMULATOR_HOST cannot redirect). The few local files
that are local by nature are listed in ALLOWED with the reason."""

import ast

from tests.helpers import REPO

PACKAGE = REPO / "lmjax"
LAYER = PACKAGE / "storage.py"

FORBIDDEN_CALLS = {
    "open",
    "os.makedirs",
    "os.listdir",
    "os.path.exists",
    "os.path.isdir",
    "os.path.isfile",
    "os.path.getsize",
    "glob.glob",
    "pathlib.Path",
    "Path",
}
# (module, function) -> why the path there is local by nature.
ALLOWED = {
    ("lmjax/commands/experiment.py", "load_experiment"): "an experiment file is Python to import",
    ("lmjax/commands/experiment.py", "<module>"): "the experiments shipped inside the package",
    ("lmjax/observe/throughput.py", "_host_rss_bytes"): "/proc/self/statm, this process's memory",
    ("lmjax/tools/aot.py", "require_libtpu"): "the libtpu shared library on this machine",
    ("lmjax/observe/metrics.py", "_upload"): "TensorBoard's local staging folder (a temp dir)",
    ("lmjax/data/documents.py", "packaged_files"): "the corpus shipped inside the package",
    ("lmjax/observe/wandb_log.py", "_files_dir"): "wandb's own files, local by construction",
    # LocalRecord (a gs:// workdir's lease is GcsRecord's, through gcsfs)
    ("lmjax/checkpoint/lease.py", "_listing"): "a local workdir's lease generations",
    ("lmjax/checkpoint/lease.py", "_load"): "a local workdir's lease generation",
    ("lmjax/checkpoint/lease.py", "swap"): "a local workdir's lease generation, linked",
    ("lmjax/checkpoint/lease.py", "_process_start"): "/proc/PID/stat of a process on this host",
}


def violations(source: str, module: str, allowed=ALLOWED) -> list[str]:
    """'module:line function: call' for each forbidden call or `gfile` use in `source`
    outside the `allowed` (module, function) pairs."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                else function
            )
            name = ast.unparse(child.func) if isinstance(child, ast.Call) else None
            gfile = (isinstance(child, ast.Attribute) and child.attr == "gfile") or (
                isinstance(child, ast.Name) and child.id == "gfile"
            )
            if (name in FORBIDDEN_CALLS or gfile) and (module, function) not in allowed:
                found.append(f"{module}:{child.lineno} {function}: {name or 'gfile'}")
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_the_rule_catches_each_kind_of_local_file_call():
    source = (
        "import os, glob\ndef f(p):\n    open(p)\n    os.makedirs(p)\n    glob.glob(p)\n"
        "    os.path.exists(p)\n    tf.io.gfile.GFile(p)\n    pathlib.Path(p)\n"
    )
    assert len(violations(source, "lmjax/x.py")) == 6
    assert not violations("def f(p):\n    storage.path(p).open()\n", "lmjax/x.py")


def test_no_module_but_the_storage_layer_touches_user_paths_directly():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != LAYER:
            module = str(path.relative_to(PACKAGE.parent))
            found += violations(path.read_text(), module)
    assert not found, (
        "use lmjax.storage for these (or list a local-by-nature file in ALLOWED):\n"
        + "\n".join(found)
    )


def test_every_allowed_entry_is_still_needed():
    sources = {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in PACKAGE.rglob("*.py")}
    for entry in ALLOWED:
        module, function = entry
        found = violations(sources[module], module, allowed=ALLOWED.keys() - {entry})
        assert any(f" {function}: " in f for f in found), f"{entry} is no longer needed"
