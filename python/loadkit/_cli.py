"""The `loadkit` console command of an installed package: runs the CLI binary shipped inside it
(bin/loadkit) with the same arguments; its exit code is the command's.

The binary finds its runtime and plugins relative to itself; torch's libraries (and the CUDA
libraries of the nvidia-* wheels torch uses) are found through LD_LIBRARY_PATH, located without
importing torch, so that the command starts as fast as the binary does.
"""
import glob
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def library_dirs() -> list[str]:
    """torch/lib and the nvidia/*/lib folders beside torch (where its CUDA libraries live)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    torch_dir = list(spec.submodule_search_locations)[0]
    site = os.path.dirname(torch_dir)
    return [os.path.join(torch_dir, "lib")] + sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))


def main() -> None:
    binary = os.path.join(HERE, "bin", "loadkit")
    if not os.access(binary, os.X_OK):
        sys.stderr.write(f"loadkit: no CLI binary at {binary} (this loadkit package was not installed from a wheel)\n")
        sys.exit(1)
    env = dict(os.environ)
    dirs = library_dirs() + [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
    os.execve(binary, ["loadkit", *sys.argv[1:]], env)


if __name__ == "__main__":
    main()
