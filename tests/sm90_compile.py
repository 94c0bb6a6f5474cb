"""Compile every tuned config of both kernels for Hopper (sm_90a) without a GPU.

The interpreter runs kernels as Python and never type-checks them the way code generation does;
this compiles them as a GPU would, and reads register spills from ptxas. Run as a script, with
TRITON_INTERPRET unset (tests/test_triton.py does); prints one JSON line per compiled variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from logitless.kernels import lse_backward, lse_forward
from logitless.kernels._tiles import COMPILE_OPTIONS, SPILLING_OPTIONS, config_fits

HOPPER = GPUTarget("cuda", 90, 32)
ALIGNED = ("N", "V", "D", "stride_en", "stride_cv", "stride_dn", "D_t", "stride_ten", "stride_tcv")
"""Integer arguments Triton specializes as multiples of 16 at model shapes."""


def forward_signature(dtype: str) -> dict[str, str]:
    pointers = {"e_ptr": dtype, "c_ptr": dtype, "bias_ptr": dtype, "weight_ptr": "fp32"}
    pointers["targets_ptr"] = "i64"
    return {
        **{name: f"*{kind}" for name, kind in pointers.items()},
        "partials_ptr": "*fp32",
        "top_values_ptr": "*fp32",
        "top_indices_ptr": "*i32",
        **dict.fromkeys(("N", "V", "D", "stride_en", "stride_cv", "vocab_bucket"), "i32"),
        "softcap": "fp32",
        "scale": "fp32",
        **teacher_signature(dtype, ("lse", "teacher_lse")),
        **SUPPORT_SIGNATURE,
    }


SUPPORT_SIGNATURE = {"support_ptr": "*i64", "support_k": "i32"}
"""A cached teacher's support, (N, k) classes per row: both kernels'."""


def teacher_signature(dtype: str, fp32_pointers: tuple[str, ...]) -> dict[str, str]:
    """The teacher head's arguments, shared by both kernels, and their fp32 row vectors."""
    pointers = {f"teacher_{name}_ptr": f"*{dtype}" for name in ("e", "c", "bias")}
    return {
        **pointers,
        **{f"{name}_ptr": "*fp32" for name in fp32_pointers},
        **dict.fromkeys(("D_t", "stride_ten", "stride_tcv"), "i32"),
        **dict.fromkeys(("teacher_softcap", "log_beta", "log_one_minus_beta"), "fp32"),
    }


def backward_signature(dtype: str) -> dict[str, str]:
    pointers = {"e_ptr": dtype, "c_ptr": dtype, "bias_ptr": dtype, "order_ptr": "i64"}
    pointers["target_positions_ptr"] = "i64"
    for name in ("lse", "grad_lse", "grad_plogp", "grad_target", "grad_sum", "weight"):
        pointers[f"{name}_ptr"] = "fp32"
    pointers["d_ptr"] = dtype
    pointers["counts_ptr"] = "i32"
    integers = ("N", "D", "position_begin", "position_end", "stride_en", "stride_cv", "stride_dn")
    return {
        **{name: f"*{kind}" for name, kind in pointers.items()},
        **dict.fromkeys((*integers, "row_bucket", "vocab_bucket"), "i32"),
        "softcap": "fp32",
        "scale": "fp32",
        "filter_mass_per_entry": "fp32",
        **teacher_signature(dtype, ("teacher_lse", "grad_q", "grad_plogpq", "grad_plogr")),
        "grad_outside_ptr": "*fp32",
        "outside_lse_ptr": "*fp32",
        "support_grad_ptr": "*fp32",
        **SUPPORT_SIGNATURE,
    }


TEACHER_FLAGS = ("TEACHER", "TEACHER_BIAS", "TEACHER_SOFTCAP")
FLAGS = {
    "forward": ("HAS_BIAS", "HAS_SOFTCAP", "WITH_SUM", "HAS_WEIGHT", "WITH_ENTROPY", "TOP_K",
                *TEACHER_FLAGS, "MIXTURE", "HAS_SUPPORT"),
    "backward": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SUM", "HAS_PLOGP", "HAS_WEIGHT", "SORTED",
                 "FILTER", *TEACHER_FLAGS, "HAS_Q", "HAS_PLOGPQ", "HAS_PLOGR", "HAS_OUTSIDE",
                 "HAS_SUPPORT_GRAD"),
}  # fmt: skip
VARIANTS = {
    "forward": {
        "smoothing": ("HAS_BIAS", "HAS_SOFTCAP", "WITH_SUM", "HAS_WEIGHT"),
        "entropy": ("HAS_BIAS", "HAS_SOFTCAP", "WITH_ENTROPY"),
        "top_k": ("HAS_BIAS", "HAS_SOFTCAP", "TOP_K"),
        "distillation": ("HAS_BIAS", "HAS_SOFTCAP", "WITH_ENTROPY", *TEACHER_FLAGS),
        "mixture": ("HAS_BIAS", "HAS_SOFTCAP", *TEACHER_FLAGS, "MIXTURE"),
        "top_k_distillation": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SUPPORT"),
    },
    "backward": {
        "smoothing": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SUM", "HAS_WEIGHT"),
        "filtered": ("HAS_BIAS", "HAS_SOFTCAP", "SORTED", "FILTER"),
        "entropy": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_PLOGP"),
        "distillation": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_PLOGP", *TEACHER_FLAGS, "HAS_Q",
                         "HAS_PLOGPQ", "HAS_PLOGR"),
        "top_k": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SUPPORT_GRAD"),
        "top_k_distillation": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_OUTSIDE", "HAS_SUPPORT_GRAD"),
    },
}  # fmt: skip
"""The register worst cases of real calls, every option a call can set together: label
smoothing with class weights (which turns filtering off), a filtered loss, log-probs with
entropy (no logit sum, no filtering), the largest top-k the forward kernel keeps, and a
distillation with a teacher head (every divergence's statistics, or the JSD's second sweep;
every teacher term), and a distillation from a cached teacher's top-k (the mass outside its
support)."""


def flags(kernel: str, variant: str) -> dict[str, bool]:
    """The flags of one variant: a worst case of `VARIANTS`, or "minimal" (a plain loss); TOP_K
    is the kernel's largest k when on."""
    on = () if variant == "minimal" else VARIANTS[kernel][variant]
    flags = {name: name in on for name in FLAGS[kernel]}
    if "TOP_K" in flags:
        flags["TOP_K"] = lse_forward.MAX_TOP_K if flags["TOP_K"] else 0
        flags["TOP_K_SLOTS"] = triton.next_power_of_2(max(1, flags["TOP_K"]))
    # at model shapes, launches have tensor descriptors unless their vocabulary is sorted
    flags["HAS_DESCRIPTORS"] = not flags.get("SORTED")
    return flags


DESCRIPTOR_BLOCKS = {"e_desc": ("BLOCK_N", "BLOCK_D"), "c_desc": ("BLOCK_V", "BLOCK_D")}
"""The tensor descriptors' blocks, as `set_descriptor_blocks` sets them for a config."""


def compile_variant(kernel, signature, constants, config) -> dict[str, object]:
    """Compile one variant; its registers, spilled bytes and shared memory."""
    unit_strides = dict.fromkeys(("stride_ed", "stride_cd", "stride_ted", "stride_tcd"), 1)
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constants = {**defaults, **constants, **config.kwargs, **unit_strides}
    element = signature["e_ptr"].removeprefix("*")
    for name, (rows, columns) in DESCRIPTOR_BLOCKS.items():
        if name in kernel.arg_names:
            signature[name] = f"tensordesc<{element}[{constants[rows]}, {constants[columns]}]>"
    full_signature = {
        name: "constexpr" if name in constants else signature[name] for name in kernel.arg_names
    }
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, (name, kind) in enumerate(full_signature.items())
        if kind.startswith("*") or name in ALIGNED
    }
    compiled = triton.compile(
        ASTSource(kernel, full_signature, constants, aligned),
        target=HOPPER,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages, **COMPILE_OPTIONS},
    )
    registers, spills = ptxas_usage(compiled.asm["ptx"])
    return {"registers": registers, "spill_bytes": spills, "shared": compiled.metadata.shared}


def ptxas_usage(ptx: str) -> tuple[int | None, int | None]:
    """(registers, spilled bytes) that ptxas reports, or Nones without a usable ptxas."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        for name in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(bin_dir, name)
            if not os.path.exists(path):
                continue
            report = subprocess.run(
                [path, "--gpu-name", "sm_90a", "-v", source.name, "-o", os.devnull],
                capture_output=True,
                text=True,
            ).stderr
            registers = re.search(r"Used (\d+) registers", report)
            spills = re.search(r"(\d+) bytes spill stores", report)
            if registers and spills:
                return int(registers.group(1)), int(spills.group(1))
    return None, None


KERNELS = {
    "forward": (lse_forward.lse_forward_kernel, forward_signature, lse_forward),
    "backward": (lse_backward.lse_backward_kernel, backward_signature, lse_backward),
}
DTYPES = {"bf16": ("tf32", "HALF_CONFIGS"), "fp32": ("ieee", "FLOAT32_CONFIGS")}


def jobs() -> list[tuple[str, str, int, str, dict[str, object]]]:
    """(kernel, dtype, config index, variant, constexpr flags) of every variant to compile."""
    found = []
    for name, (_, _, module) in KERNELS.items():
        for dtype, (precision, configs) in DTYPES.items():
            for index, config in enumerate(getattr(module, configs)):
                variants = list(VARIANTS[name])
                for variant in [*variants, "minimal"] if index == 0 else variants:
                    constants = flags(name, variant)
                    never = (
                        constants.get("TEACHER")
                        or constants.get("HAS_SUPPORT")
                        or (config.kwargs.get("TMA") and not constants["HAS_DESCRIPTORS"])
                    )
                    if never and not config_fits(config, constants):
                        continue  # never launched with a teacher or a support, nor TMA sorted
                    if not config_fits(config, constants):  # the most this config is run with
                        constants.update(
                            dict.fromkeys(set(SPILLING_OPTIONS) & set(constants), False)
                        )
                    if not config_fits(config, constants):  # grouped: never filtered
                        constants.update(FILTER=False, SORTED=False)
                    constants.update(DOT_PRECISION=precision, DOT_UPCAST=False)
                    found.append((name, dtype, index, variant, constants))
    return found


def run(job: tuple[str, str, int, str, dict[str, object]]) -> str:
    """One job of `jobs`, compiled: its JSON line."""
    name, dtype, index, variant, constants = job
    kernel, signature, module = KERNELS[name]
    config = getattr(module, DTYPES[dtype][1])[index]
    usage = compile_variant(kernel, signature(dtype), constants, config)
    record = {"kernel": name, "dtype": dtype, "config": str(config)}
    record.update(variant=variant, every_option=variant != "minimal")
    return json.dumps({**record, **usage})


def main() -> None:
    """Every variant, compiled in parallel on the machine's cores (a compile is one thread)."""
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for line in pool.map(run, jobs()):
            print(line, flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")
    main()
