"""Loads the compiled extension lora_ext._C, which registers torch.ops.lora_ext.*.

Running `python -m lora_ext.demo` or `python -m pytest` from the repository root after
`pip install --no-build-isolation .` imports this source folder (Python puts the working directory first on
sys.path), which holds no compiled _C unless it was built in place. Then the installed copy's _C is used,
so the README's commands work from the checkout too.
"""
import glob
import importlib
import os
import sys


def load_extension(package):
    try:
        return importlib.import_module(package.__name__ + "._C")
    except ImportError as local_error:
        here = os.path.dirname(os.path.abspath(package.__file__))
        for entry in sys.path:
            candidate = os.path.join(os.path.abspath(entry or os.getcwd()), "lora_ext")
            if os.path.abspath(candidate) == here or not glob.glob(os.path.join(candidate, "_C*")):
                continue
            package.__path__.append(candidate)
            return importlib.import_module(package.__name__ + "._C")
        raise ImportError(
            f"lora_ext's compiled extension (_C) is not built: {local_error}. Install lora_ext with "
            "`pip install --no-build-isolation .`, or build it in place with `pip install --no-build-isolation -e .`."
        ) from local_error
