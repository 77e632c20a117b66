"""The README's µP table and config reference, generated from the code (a test keeps them in sync).

    python -m fastwidth.param.doc          # rewrite the generated sections of README.md

The µP table is read off `param_info` itself: each multiplier is evaluated at two widths and its
power of m is recovered, so the README cannot drift from what the trainer does.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from fastwidth.config import load_config, reference_rows
from fastwidth.nn.roles import Init, Role
from fastwidth.param.scaling import fan_in, param_info

KINDS = ("mup", "mean_field", "sp", "ntk")
ROLES = ((Role.INPUT, Init.FAN_IN, "input (first layer, embedding)"),
         (Role.HIDDEN, Init.FAN_IN, "hidden (q/k/v/o, MLP, conv)"),
         (Role.OUTPUT, Init.FAN_IN, "output (readout)"),
         (Role.VECTOR, Init.ZEROS, "vector (biases, gains)"),
         (Role.FIXED, Init.ZEROS, "fixed (readout bias)"))
BASE = 64


def _power(f, what: str = "") -> str:
    """Render f(m) = c · what · m^k as text, from f at m = 2 and m = 4."""
    a, b = f(2.0), f(4.0)
    if a == 0 and b == 0:
        return "0"
    k = round(math.log2(b / a) * 2) / 2
    c = a / 2.0 ** k
    head = what or "1"
    if not math.isclose(c, 1.0):
        head = f"{c:g}·{what}" if what else f"{c:g}"
    if k == 0:
        return head
    mpow = {1: "·m", -1: "/m", 0.5: "·√m", -0.5: "/√m"}.get(k, f"·m^{k:g}")
    if head == "1" and mpow.startswith("·"):
        return mpow[1:]
    return head + mpow


def _info(kind: str, opt: str, role: Role, init: Init, m: float, gamma0: float = 2.0):
    width = int(BASE * m)
    cfg = load_config(None, [f"param.kind={kind}", f"optim.name={opt}", f"param.base_width={BASE}",
                             f"model.width={width}", "param.zero_readout=false", f"param.gamma0={gamma0}"])
    shape = {Role.INPUT: (width, 10), Role.HIDDEN: (width, width), Role.OUTPUT: (10, width)}.get(role, (width,))
    return param_info("w", shape, role, init, cfg)


def mup_markdown() -> str:
    lines = ["| kind | role | init std (× σ/√fan_in) | forward mult | Adam LR | SGD LR | Adam WD | SGD WD |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        for role, init, label in ROLES:
            def get(attr, opt="adamw"):
                return lambda m: getattr(_info(kind, opt, role, init, m), attr)

            def std_rel(m):
                info = _info(kind, "adamw", role, init, m)
                return info.init_std * math.sqrt(fan_in(info.shape)) if init is Init.FAN_IN else 0.0

            def fwd(m):  # ntk's matrices carry 1/√fan_in: show the rest
                info = _info(kind, "adamw", role, init, m)
                scale = math.sqrt(fan_in(info.shape)) if (kind == "ntk" and init is Init.FAN_IN) else 1.0
                return info.forward_mult * scale
            init_txt = ("const" if init is Init.ZEROS else
                        ("N(0, σ²)" if kind == "ntk" else _power(std_rel, "")))
            fwd_txt = _power(fwd, "α" if role is Role.OUTPUT else "")
            if kind == "ntk" and init is Init.FAN_IN:
                fwd_txt = "1/√fan_in" if fwd_txt == "1" else f"{fwd_txt}/√fan_in"
            lines.append(f"| {kind} | {label} | {init_txt} | {fwd_txt} | {_power(get('lr_mult'), 'η')} | "
                         f"{_power(get('lr_mult', 'sgd'), 'η')} | {_power(get('wd_mult'), 'wd')} | "
                         f"{_power(get('wd_mult', 'sgd'), 'wd')} |")
    lines.append("")
    lines.append("m = width / base_width, α = param.output_mult, σ = param.init_std; mean_field rows are at "
                 "γ0 = 2 (output ÷γ0, LR ×γ0 Adam, ×γ0² SGD). The readout is zero-initialized under µP kinds "
                 "unless param.zero_readout=false (the row shows the non-zero std); gains start at 1, biases at 0. "
                 "The init column is the std s of N(0, s²) under param.init=normal (the default); param.init=torch "
                 "draws U(±s) instead (std s/√3: PyTorch's nn.Linear/Conv default as mup's set_base_shapes "
                 "leaves it) and biases U(±1/√fan_in), their layer's fan_in taken at base width where it grows.")
    return "\n".join(lines)


# The depth kinds and umup: (role, init, on a residual branch, the layer a bias belongs to, label)
PLACES = ((Role.INPUT, Init.EMBED, False, None, "embedding"),
          (Role.HIDDEN, Init.FAN_IN, True, None, "hidden matrix in a block"),
          (Role.VECTOR, Init.ONES, True, None, "norm gain in a block"),
          (Role.VECTOR, Init.BIAS, True, Role.HIDDEN, "linear bias in a block"),
          (Role.VECTOR, Init.ONES, False, None, "final norm gain"),
          (Role.OUTPUT, Init.FAN_IN, False, None, "readout"))


def _depth_info(kind: str, role: Role, init: Init, on_branch: bool, layer_role, mN: float, mL: float,
                base_width: int, base_depth: int):
    width, depth = round(base_width * mN), round(base_depth * mL)
    # a GPT (what every kind here takes; head_dim 2 divides the widths), never built: only its config
    cfg = load_config(None, ["model.arch=gpt", "model.head_dim=2", f"param.kind={kind}",
                             f"param.base_width={base_width}", f"model.width={width}", f"param.base_depth={base_depth}",
                             f"model.depth={depth}", "param.zero_readout=false"])
    shape = {Role.INPUT: (10, width), Role.HIDDEN: (width, width), Role.OUTPUT: (10, width)}.get(role, (width,))
    layer = (layer_role, (width, width)) if layer_role is not None else None
    return param_info("w", shape, role, init, cfg, layer, on_branch)


def _monomial(f, what: str, n: str, l: str) -> str:
    """f(m_N, m_L) = c · what · n^a · l^b as text, from f at (2, 2), (4, 2) and (2, 4)."""
    v = f(2.0, 2.0)
    if v == 0:
        return "0"
    a, b = (round(math.log2(f(*x) / v) * 4) / 4 for x in ((4.0, 2.0), (2.0, 4.0)))
    c = v / 2.0 ** (a + b)
    text = what if math.isclose(c, 1.0) else (f"{c:.3g}·{what}" if what else f"{c:.3g}")
    for sym, k in ((n, a), (l, b)):
        if k:
            text += {1: f"·{sym}", -1: f"/{sym}", 0.5: f"·√{sym}", -0.5: f"/√{sym}"}.get(k, f"·{sym}^{k:g}")
    text = text or "1"
    return text[1:] if text.startswith("·") else (f"1{text}" if text.startswith("/") else text)


def _init_text(info, mN: float) -> str:
    if info.init in ("zeros", "ones"):
        return "1" if info.init == "ones" else "0"
    fan = fan_in(info.shape)
    stds = ((1.0, "σ"), (1.0 / math.sqrt(fan), "σ/√fan_in"), (math.sqrt(mN / fan), "σ·√(m_N/fan_in)"))
    for value, text in stds:
        if math.isclose(info.init_std, value):
            return text
    return f"{info.init_std:g}"


def depth_markdown() -> str:
    lines = ["| kind | parameter | init std | forward mult | Adam LR | Adam WD | Adam ε (auto) | branch |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("depth_mup", "completep", "umup"):
        # umup's rules use absolute sizes: shown at base 1, so N = fan_in (= the width here) and L = depth
        absolute = kind == "umup"
        bw, bd, n, l = (1, 1, "N", "L") if absolute else (BASE, 2, "m_N", "m_L")
        for role, init, on_branch, layer_role, label in PLACES:
            def get(attr, width_base=bw, depth_base=bd):
                return lambda mN, mL: getattr(_depth_info(kind, role, init, on_branch, layer_role, mN, mL,
                                                          width_base, depth_base), attr)
            info = _depth_info(kind, role, init, on_branch, layer_role, 2.0, 2.0, BASE, 2)
            init_txt = "N(0, embed_std²)" if init is Init.EMBED else _init_text(info, 2.0)
            eps = _monomial(get("eps_mult", BASE, 2), "ε", "m_N", "m_L")  # ε: against the base shape, every kind
            fwd = _monomial(get("forward_mult"), "α" if role is Role.OUTPUT else "", n, l)
            lines.append(f"| {kind} | {label} | {init_txt} | {fwd} | "
                         f"{_monomial(get('lr_mult'), 'η', n, l)} | {_monomial(get('wd_mult'), 'wd', n, l)} | {eps} | "
                         f"{_monomial(get('branch_mult'), '', n, l)} |")
    lines.append("")
    lines.append("m_N = width / base_width, m_L = depth / base_depth; depth_mup has α_L = ½, completep α_L = 1 "
                 "(param.depth_alpha overrides it). umup rows are in absolute sizes: N = fan_in (here the width; "
                 "an embedding's LR uses its width, as unit_scaling.optim does), L = depth. The ε column is "
                 "optim.eps_scaling=auto (width under these kinds; none drops the m_N factor). With "
                 "optim.weight_decay_mode=independent every WD multiplier is 1.")
    return "\n".join(lines)


def config_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, help_ in reference_rows():
        lines.append(f"| `{key}` | {tname} | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


SECTIONS = {"mup-table": mup_markdown, "depth-table": depth_markdown, "config-reference": config_markdown}


def render(readme: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
        readme = pattern.sub(lambda m_: m_.group(1) + fn() + "\n" + m_.group(2), readme)
    return readme


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    path.write_text(render(path.read_text()))
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
