"""fastwidth: train µP networks at many widths on one online stream and measure whether they agree.

Implements the measurements of Vyas et al., "Feature-Learning Networks Are Consistent Across
Widths At Realistic Scales" (arXiv 2305.18411). From Python:

    import fastwidth
    run_dir = fastwidth.train("demo", train__steps=50)
    run = fastwidth.load_run(run_dir)
    model = fastwidth.load_model(run_dir, "w64_s0")
    c = fastwidth.Consistency({"small": (m64, 64, 0), "big": (m256, 256, 0)}, probe=(x, y), run_dir="runs/mine",
                              steps=1000)   # the statistics inside your own loop (interop/consistency.py)

`import fastwidth` is cheap: torch and the rest load on first use of these functions.
"""
__version__ = "0.1.0"
__all__ = ["train", "load_run", "load_model", "make_config", "Consistency", "__version__"]


def __getattr__(name):  # PEP 562: the API without importing torch at `import fastwidth`
    if name in ("train", "load_run", "load_model", "make_config"):
        from fastwidth import api
        return getattr(api, name)
    if name == "Consistency":  # the statistics inside another training loop (interop/consistency.py)
        from fastwidth.interop.consistency import Consistency
        return Consistency
    raise AttributeError(f"module 'fastwidth' has no attribute {name!r}")
