"""Registers, spills, shared memory and tensor-core use of every linear-path kernel (csrc_triton/linear_logprob.py,
csrc_triton/linear_chunked.py) at the launch constants its launcher picks on CUDA, for sm_80 and sm_90, without a
GPU: Triton compiles to PTX for the target and its bundled ptxas reports the resources.

    python benches/linear_kernel_regs.py          # prints a table; exit code 1 on any spill / smem / mma failure

Pointers, H and the row strides are marked 16-divisible, as Triton's JIT specialises them for real launches
(without that, loads are not vectorised and the register counts are meaningless). Must run without
TRITON_INTERPRET (the compiler needs the JIT functions).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csrc_triton import linear_chunked, linear_logprob

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def report(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, cap: int, options=None) -> dict:
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(signature)
        if n.endswith("_ptr") or n == "H" or n.startswith("stride")
    }
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(
        ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", cap, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages, **(options or {})),
    )
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    rep = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    text = rep.stdout + rep.stderr
    found = re.search(r"Used (\d+) registers", text)
    if found is None:
        raise RuntimeError(f"ptxas gave no register report:\n{text[-2000:]}")
    return dict(
        regs=int(found.group(1)),
        spills=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text)),
        smem=compiled.metadata.shared,
        dot="wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma"),
    )


def main() -> int:
    rows = []
    cuda = torch.device("cuda")
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        t, f = f"*{dtype}", "*fp32"
        head = dict(h_ptr=t, w_ptr=t, b_ptr=t, labels_ptr="*i64", valid_ptr="*u8")
        sizes = dict(T="i32", V="i32", H="i32", stride_h="i32", stride_w="i32", inv_temperature="fp32")
        grads = dict(g_ptr=f, lse_ptr=f, g_ent_ptr=f, ent_ptr=f)
        cases = [
            ("fwd", linear_logprob._fwd_kernel, {**head, "logp_ptr": f, "lse_ptr": f, "entropy_ptr": f, **sizes},
             dict(HAS_BIAS=True, RETURN_ENTROPY=True)),
            ("dh", linear_logprob._bwd_dh_kernel, {**head, **grads, "dh_ptr": f, **sizes},
             dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True)),
            ("dw", linear_logprob._bwd_dw_kernel, {**head, **grads, "dw_ptr": f, "db_ptr": f, **sizes},
             dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True)),
        ]  # fmt: skip
        for kind, kernel, sig, flags in cases:
            blocks = linear_logprob._blocks(cuda, tdt, False, kind)
            warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
            for cap in (80, 90):
                r = report(kernel, sig, {**flags, **blocks}, warps, stages, cap)
                tiles = (blocks["BLOCK_T"], blocks["BLOCK_V"], blocks["BLOCK_H"])
                rows.append((f"linear_logprob.{kind}", dtype, cap, f"{tiles} w{warps} s{stages}", r))
        # chunk logits in fp32 (the default) and in the input dtype (fp32_logits=False); dZ in the input dtype
        for z in dict.fromkeys((f, t)):
            row = dict(z_ptr=z, labels_ptr="*i64", valid_ptr="*u8")
            idx = dict(labels_ptr="*i64", valid_ptr="*u8")
            for name, kernel, sig, flags in (
                ("row_fwd", linear_chunked._row_fwd_kernel,
                 {**row, "logp_ptr": f, "lse_ptr": f, "ent_ptr": f, "V": "i32", "stride_z": "i32",
                  "inv_temperature": "fp32"}, dict(RETURN_ENTROPY=True)),
                ("row_bwd", linear_chunked._row_bwd_kernel,
                 {"z_ptr": z, "dz_ptr": t, **idx, **grads, "V": "i32", "stride_z": "i32", "stride_dz": "i32",
                  "inv_temperature": "fp32"}, dict(HAS_GRAD_ENTROPY=True)),
            ):  # fmt: skip
                blocks = linear_chunked._block_v(cuda)
                warps = blocks.pop("num_warps")
                for cap in (80, 90):
                    r = report(kernel, sig, {**flags, **blocks}, warps, 3, cap)
                    cfg = f"z {z[1:]} BLOCK_V={blocks['BLOCK_V']} w{warps}"
                    rows.append((f"linear_chunked.{name}", dtype, cap, cfg, r))
    bad = []
    print(f"triton {triton.__version__}")
    print(f"| {'kernel':24} | dtype | sm | {'config':24} | regs | spill B | smem B | dot |")
    print(f"| {'-' * 24} | ----- | -- | {'-' * 24} | ---- | ------- | ------ | --- |")
    for name, dtype, cap, cfg, r in rows:
        print(f"| {name:24} | {dtype:5} | {cap} | {cfg:24} | {r['regs']:4} | {r['spills']:7} | {r['smem']:6} | "
              f"{r['dot']} |")  # fmt: skip
        tiled = name.startswith("linear_logprob")
        if r["spills"] or r["smem"] > SMEM_LIMIT[cap] or (tiled and dtype == "bf16" and r["dot"] == "fma"):
            bad.append((name, dtype, cap, r))
    for b in bad:
        print("FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the compiler needs the JIT functions")
    sys.exit(main())
