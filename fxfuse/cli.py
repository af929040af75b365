"""The ``fxfuse`` command: see what fxfuse fuses, declines and generates for your model.

    fxfuse demo                          a naive transformer rewritten, checked and measured
    fxfuse explain FILE.py:FACTORY       what fxfuse does to your model (--html, --dump, --passes)
    fxfuse explain pkg.module:FACTORY
    fxfuse explain --compile ...         through torch.compile: one report per graph (graph breaks)
    fxfuse kernels DIR                   the kernels in a --dump directory or kernel cache
    fxfuse explain|kernels ... --target sm_90   each kernel compiled for that GPU (no GPU needed):
                                         registers, spills, shared memory, tensor cores per config

A FACTORY is a function, called with no arguments, that returns (model, example_inputs) or
(model, example_inputs, example_kwargs): the model (a torch.nn.Module or any callable), a tuple of
example inputs (a single tensor is taken as one input) and a dict of keyword arguments. E.g.

    def make():
        return MyModel(dim=64), (torch.randn(2, 16, 64),)

Every script in examples/ has one: fxfuse explain examples/quickstart.py:make

Exit status: 0 success, 1 the model or fxfuse failed, 2 the command line was wrong (missing file,
bad target, unknown factory or pass).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from pathlib import Path


class UsageError(Exception):
    """The command line names something that is not there (exit status 2)."""


class RunError(Exception):
    """The user's code or the rewrite failed (exit status 1)."""


def _user_traceback(err: BaseException, skip_frames: int) -> str:
    """The traceback without the first ``skip_frames`` frames (ours), so it starts in user code."""
    tb = err.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))


def _load_module_from_file(path: Path):
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    # The file's folder goes on sys.path, as `python file.py` would do, so it can import its neighbours.
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"fxfuse_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.stderr.write(_user_traceback(err, 1))
        raise RunError(f"importing {path} raised {type(err).__name__}: {err}") from None
    return module


def _import_module(name: str):
    sys.path.insert(0, os.getcwd())  # `package.module` is looked up from here first, like `python -m`
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise UsageError(f"cannot import module {name!r}: no module named {err.name!r}") from None
        sys.stderr.write(_user_traceback(err, 1))
        raise RunError(f"importing {name} raised {type(err).__name__}: {err}") from None
    except Exception as err:
        sys.stderr.write(_user_traceback(err, 1))
        raise RunError(f"importing {name} raised {type(err).__name__}: {err}") from None


def load_factory(target: str):
    """``path/to/file.py:factory`` or ``package.module:factory`` → the factory callable."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise UsageError(f"bad target {target!r}: expected path/to/file.py:factory or package.module:factory")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _load_module_from_file(Path(where)) if is_file else _import_module(where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            # Functions only: a class is callable but builds a model, not (model, example_inputs).
            names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            hint = f" (its functions: {', '.join(names)})" if names else " (it defines no function)"
            raise UsageError(f"factory {attr!r} not found in {where}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{attr!r} in {where} is a {type(obj).__name__}, not a callable factory")
    return obj


def _device_problem(tensors) -> str | None:
    import torch

    for t in tensors:
        kind = t.device.type
        if kind == "meta":
            return "tensors on the meta device (no data): build them on 'cpu' or 'cuda'"
        backend = getattr(torch, kind, None)
        if kind != "cpu" and backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            return f"tensors on device {kind!r}, which is not available here"
    return None


def call_factory(factory, name: str):
    """Call the factory and check what it returned: ``(model, args, kwargs)``."""
    import torch
    import torch.utils._pytree as pytree

    try:
        made = factory()
    except Exception as err:
        sys.stderr.write(_user_traceback(err, 1))
        text = f"{type(err).__name__}: {err}".splitlines()[0]
        # A CPU build says "not compiled with CUDA", a CUDA build without a GPU "no NVIDIA driver".
        if ("cuda" in text.lower() or "nvidia" in text.lower()) and not torch.cuda.is_available():
            raise RunError(f"factory {name} asked for a CUDA device, and this machine has none "
                           f"(torch.cuda.is_available() is False): {text}") from None
        raise RunError(f"factory {name} raised {text}") from None
    if not (isinstance(made, (tuple, list)) and len(made) in (2, 3)):
        raise RunError(f"factory {name} must return (model, example_inputs) or (model, example_inputs, "
                       f"example_kwargs); it returned {type(made).__name__!r} object")
    model, args, kwargs = made[0], made[1], (made[2] if len(made) == 3 else {})
    if not callable(model):
        raise RunError(f"factory {name} returned {type(model).__name__!r} object as the model; "
                       "expected a torch.nn.Module or a callable")
    if isinstance(args, torch.Tensor) or not isinstance(args, (tuple, list)):
        args = (args,)
    if not isinstance(kwargs, dict):
        raise RunError(f"factory {name} returned example_kwargs of type {type(kwargs).__name__}; expected a dict")
    tensors = [leaf for leaf in pytree.tree_leaves((tuple(args), kwargs)) if isinstance(leaf, torch.Tensor)]
    problem = _device_problem(tensors)
    if problem:
        raise RunError(f"the example inputs from factory {name} have {problem}")
    if isinstance(model, torch.nn.Module):
        problem = _device_problem([*model.parameters(), *model.buffers()])
        if problem:
            raise RunError(f"the model from factory {name} has {problem}")
    return model, tuple(args), kwargs


def _check_outputs(opts) -> None:
    """Fail on an unwritable --html/--dump before the model is built, not after the work is done."""
    if opts.html and not Path(opts.html).resolve().parent.is_dir():
        raise UsageError(f"--html {opts.html}: the folder {Path(opts.html).resolve().parent} does not exist")
    if opts.dump:
        try:
            Path(opts.dump).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--dump {opts.dump}: cannot create the folder ({err.strerror or err})") from None


def cmd_explain(opts) -> int:
    _check_outputs(opts)
    factory = load_factory(opts.target)
    if opts.passes is not None:
        from fxfuse.passes.pipeline import parse_pipeline

        try:
            passes = parse_pipeline(opts.passes)
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
        if not passes:
            raise UsageError(f"--passes {opts.passes!r} names no pass, so nothing would run; name at least one "
                             "(e.g. --passes canonicalize,fuse-norm) or leave --passes out for all of them")
    model, args, kwargs = call_factory(factory, opts.target)

    import fxfuse

    options = {"debug_dir": str(Path(opts.dump).resolve())} if opts.dump else {}
    if opts.compile:
        text, page, backend = _explain_compiled(model, args, kwargs, opts.passes, options, opts.html)
    else:
        try:
            res = fxfuse.rewrite(model, args, passes=opts.passes, options=options, example_kwargs=kwargs)
        except fxfuse.CaptureError as err:
            raise RunError(_capture_failure(err)) from None
        text = res.report()
        page = res.report_data.html() if opts.html else None  # draws the graph before and after
    if not (opts.gpu_target and opts.json):
        print(text)
    if opts.gpu_target:
        from fxfuse import target_check

        graphs = [r.after for r in backend.reports] if opts.compile else [res.report_data.after]
        status = target_check.print_rows([x for gm in graphs if gm is not None
                                          for x in target_check.launches_of_graph(gm)], opts.gpu_target, opts.json)
        if status:
            return status
    if opts.dump:
        (Path(opts.dump) / "report.txt").write_text(text + "\n")
        print(f"graphs and kernels written to {opts.dump}")
    if opts.html:
        Path(opts.html).write_text(page, encoding="utf-8")
        print(f"HTML report written to {opts.html}")
    return 0


def _capture_failure(err: Exception) -> str:
    """fxfuse's capture message for the command line: its cause (the user's frames and the
    exception) goes to stderr first, as the message says."""
    cause = err.__cause__
    message = str(err).replace("\n", " ")
    if cause is None:
        return message
    from fxfuse.frames import is_library_frame

    frames = [f for f in traceback.extract_tb(cause.__traceback__) if not is_library_frame(f.filename)]
    sys.stderr.write("Traceback (most recent call last; your frames only):\n" if frames else "The original exception:\n")
    sys.stderr.write("".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(cause), cause)))
    return message.replace("the original exception is chained below", "the original exception is shown above")


def _explain_compiled(model, args, kwargs, passes, options, html: bool):
    """``explain --compile``: one call through ``torch.compile(backend=fxfuse.Backend())``, which
    splits the model around code a single capture cannot take (graph breaks); one report per graph."""
    import torch

    import fxfuse

    backend = fxfuse.Backend(passes=passes, **options)
    torch._dynamo.reset()  # a model compiled before in this process would not reach the new backend
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed:
        raise  # fxfuse's own failure: main() keeps the whole traceback for the bug report
    except Exception as err:
        sys.stderr.write(_user_traceback(err, 1))
        cause = err
        while cause.__cause__ is not None:  # Dynamo wraps the model's own error: name that one
            cause = cause.__cause__
        lines = f"{type(cause).__name__}: {cause}".splitlines()
        text = lines[0]
        # Dynamo's messages put the cause on an "Explanation:" line below a generic first line.
        explanation = next((line.strip() for line in lines if line.strip().startswith("Explanation:")), "")
        if explanation:
            text += f" ({explanation.removeprefix('Explanation:').strip()})"
        raise RunError(f"running the model under torch.compile raised {text}") from None
    return backend.report(), (backend.html() if html else None), backend


def read_kernel_header(path: Path) -> dict | None:
    """The spec of a kernel file written by fxfuse (its leading comments), or None for other files."""
    words, spec = [], None
    try:
        with path.open() as f:
            for line in f:
                if not line.startswith("#"):
                    break
                body = line[1:].strip()
                if body.startswith("spec:"):
                    spec = json.loads(body[len("spec:"):])
                elif not body.startswith("Generated by fxfuse"):
                    words.append(body)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if spec is None:
        return None
    # Norm specs name their kind; every kernel's file is named fxfuse_<family>_<hash> (attention's).
    named = re.fullmatch(r"fxfuse_(\w+?)_[0-9a-f]{12}", path.stem)
    kind = spec.get("kind") or (named.group(1) if named else None) or (words[0].split(":")[0].split(",")[0] if words else "?")
    return {"name": path.stem, "kind": kind, "spec": spec, "words": " ".join(words), "path": str(path)}


def cmd_kernels(opts) -> int:
    root = Path(opts.dir)
    if not root.is_dir():
        raise UsageError(f"no such directory: {root}")
    # A --dump / FXFUSE_DEBUG_DIR directory keeps its kernels in kernels/; a cache dir holds them at top level.
    files = sorted([*root.glob("*.py"), *root.glob("kernels/*.py")])
    found = [k for k in map(read_kernel_header, files) if k is not None]
    if opts.gpu_target and found:
        from fxfuse import target_check

        return target_check.print_rows(target_check.launches_of_files(found), opts.gpu_target, opts.json)
    if opts.json:
        for k in found:
            print(json.dumps(k, sort_keys=True))
        return 0 if found else 1
    if not found:
        print(f"no fxfuse kernels in {root} ({len(files)} other .py file(s))")
        return 1
    print(f"{len(found)} fxfuse kernel(s) in {root}:")
    width = max(len(k["name"]) for k in found)
    for k in found:
        print(f"  {k['name']:<{width}}  {k['words']}")
        if opts.verbose:
            print(f"  {'':<{width}}  {k['path']}\n  {'':<{width}}  spec: {json.dumps(k['spec'], sort_keys=True)}")
    return 0


def _gpu_target(text: str) -> str:
    from fxfuse.runtime.configs import SHARED_BYTES, arch_of

    try:
        arch = arch_of(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if arch not in SHARED_BYTES:
        raise argparse.ArgumentTypeError(f"unknown GPU target {text!r}; use one of "
                                         f"{', '.join(f'sm_{a}' for a in sorted(SHARED_BYTES))}")
    return f"sm_{arch}"


def _add_target_options(parser, json_flag: bool = True) -> None:
    parser.add_argument("--target", dest="gpu_target", metavar="sm_90", type=_gpu_target,
                        help="compile every generated kernel for this GPU (no GPU needed) at every launch config "
                             "fxfuse would try, and print registers, spills, shared memory and tensor-core use")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="with --target: one JSON object per line")


def cmd_demo(opts) -> int:
    from fxfuse import demo

    return demo.run(show_kernel=not opts.no_kernel, inductor=opts.inductor, html=opts.html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfuse", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", choices=["debug", "info", "warning"], help="log level of the fxfuse logger "
                        "(default: FXFUSE_LOG or warning)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="rewrite a naive transformer, check it and measure it")
    demo.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                      help="compare with torch.compile's Inductor (default: on; --no-inductor skips its "
                      "compilation, about 25 s on a 2-core CPU with a cold cache)")
    demo.add_argument("--no-kernel", action="store_true", help="do not print the generated kernel")
    demo.add_argument("--html", metavar="FILE", help="also write the HTML report")
    demo.set_defaults(run=cmd_demo)

    explain = sub.add_parser("explain", help="show what fxfuse matches, declines and generates for a model")
    explain.add_argument("target", help="path/to/file.py:factory or package.module:factory; the factory is a "
                         "function with no arguments returning (model, example_inputs) or (model, example_inputs, "
                         "example_kwargs)")
    explain.add_argument("--passes", help="pass pipeline, e.g. canonicalize,fuse-norm (default: all)")
    explain.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with graph pictures")
    explain.add_argument("--dump", metavar="DIR", help="write the graphs (before/after) and kernels to DIR")
    explain.add_argument("--compile", action="store_true",
                         help="go through torch.compile(model, backend=fxfuse.Backend()) instead of fxfuse.rewrite: "
                         "Dynamo splits the model around code one capture cannot take (graph breaks), one report "
                         "per graph, all of them in the --html page")
    _add_target_options(explain)
    explain.set_defaults(run=cmd_explain)

    kernels = sub.add_parser("kernels", help="list the fxfuse kernels in a directory, with their specs")
    kernels.add_argument("dir", help="a --dump directory, FXFUSE_DEBUG_DIR or the kernel cache")
    kernels.add_argument("-v", "--verbose", action="store_true", help="also print each file and its full spec")
    kernels.add_argument("--json", action="store_true", help="one JSON object per kernel")
    _add_target_options(kernels, json_flag=False)
    kernels.set_defaults(run=cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)  # argparse itself exits with status 2 on bad usage
    if opts.log:
        from fxfuse.log import set_level

        set_level(opts.log)
    try:
        return opts.run(opts)
    except UsageError as err:
        print(f"fxfuse: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"fxfuse: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fxfuse kernels DIR | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # a failure inside fxfuse itself: keep the whole traceback for the bug report
        traceback.print_exc()
        print(f"fxfuse: error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
