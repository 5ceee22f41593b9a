"""
The repository's layout rules, checked on the source tree.

- No top-level module or package of the project has the import name of a package users of this field install:
  run from the project root, the project's file would be imported in its place (a `kernels.py` in the root makes
  transformers' `from kernels import ...` fail, so GptOssForCausalLM.from_pretrained cannot load a checkpoint).
  Checked against a list of such packages (most are not installed here) and against every top-level name the
  installed distributions provide.
- The project's own modules are imported at the top of each module, never inside a function (tests excepted):
  the imports say what a module depends on, and a function-local import hides a dependency or a cycle.
"""
import ast
import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Import names of packages installed beside a VLM training project (the Hugging Face stack, the kernels and
# training libraries, the scientific stack). `tools`: Mako 1.4.0 (pulled in by Alembic) and pure-python-adb install
# a top-level `tools` package (sqlalchemy/mako#438, Swind/pure-python-adb#45), so the project's tools folder is not
# named that.
ECOSYSTEM = {
    "kernels", "datasets", "evaluate", "accelerate", "peft", "transformers", "tokenizers", "safetensors", "triton",
    "timm", "open_clip", "torch", "torchvision", "torchaudio", "numpy", "scipy", "sklearn", "pandas", "PIL",
    "bitsandbytes", "deepspeed", "megatron", "apex", "vllm", "trl", "flash_attn", "xformers", "liger_kernel",
    "diffusers", "optimum", "huggingface_hub", "sentencepiece", "tiktoken", "einops", "lightning",
    "pytorch_lightning", "wandb", "tensorboard", "fairscale", "torchtitan", "tools",
}


def top_level_names():
    """{import name: path} of the project's top-level modules (*.py in the root) and packages (folders with an
    __init__.py)."""
    names = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            names[entry[:-3]] = entry
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names[entry] = entry + "/"
    return names


def test_no_top_level_name_shadows_an_ecosystem_package():
    names = top_level_names()
    assert {"model", "fused", "fused_cpu", "data"} <= names.keys()  # the walk sees the project
    clashes = {name: path for name, path in names.items() if name in ECOSYSTEM}
    assert not clashes, f"top-level names that shadow a package users install: {clashes}; rename them"
    installed = importlib.metadata.packages_distributions()  # {top-level import name: [distributions]}
    clashes = {names[name]: installed[name] for name in names.keys() & installed.keys()}
    assert not clashes, f"top-level names that an installed distribution also provides: {clashes}; rename them"


def project_sources():
    """Every .py file of the project outside tests/ (relative paths)."""
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "out"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.normpath(os.path.join(rel, f))


def function_local_imports(source, project):
    """(line, function, module) of each import inside a function body whose top-level name is one of `project`
    (relative imports count as the project's)."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["." * node.level + (node.module or "")]
            else:
                continue
            for module in modules:
                if module.startswith(".") or module.split(".")[0] in project:
                    found.append((node.lineno, func.name, module))
    return sorted(set(found))


def test_function_local_imports_finds_them():
    """The checker itself: it finds project imports at any depth inside functions and methods, and only those."""
    source = ("import model\n"
              "def f():\n    import json\n    if True:\n        from data import loader\n"
              "class C:\n    def m(self):\n        import model as M, os\n        from . import fused\n")
    assert function_local_imports(source, {"model", "data", "fused"}) == [
        (5, "f", "data"), (8, "m", "model"), (9, "m", ".")]


def test_project_modules_are_imported_at_the_top():
    project = set(top_level_names())
    offenders = []
    for rel in project_sources():
        with open(os.path.join(ROOT, rel)) as f:
            source = f.read()
        offenders += [f"{rel}:{line}: import {module} inside {func}()"
                      for line, func, module in function_local_imports(source, project)]
    assert not offenders, ("the project's own modules must be imported at the top of the module:\n"
                           + "\n".join(offenders))
