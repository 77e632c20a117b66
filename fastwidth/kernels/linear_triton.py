"""The Triton kernels of fastwidth.kernels.linear: the fused µP GEMM (alpha·x Wᵀ + b, the
activation and, for swiglu, the second GEMM in its epilogue; also the backward's dx and dW GEMMs
through strides) and the backward's elementwise activation gradient.

linear.py holds the reference, the tile table, the AOT table and launchers, registered ops,
autograd and the functional, and imports these kernels by name.
"""

from __future__ import annotations

from fastwidth.kernels._triton import HAS_TRITON, gelu_tanh_inner, jit, tl

# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _act_fwd(z, z2, ACT: tl.constexpr):
        # z, z2 fp32; 1 gelu (tanh form), 2 relu, 3 swiglu (silu(z) * z2), 4 the sum
        if ACT == 1:
            return 0.5 * z * (1.0 + gelu_tanh_inner(z))
        if ACT == 2:
            return tl.maximum(z, 0.0)
        if ACT == 3:
            return z / (1.0 + tl.exp(-z)) * z2
        if ACT == 4:
            return z + z2
        return z

    @jit
    def _round_bf16(v):
        # round-to-nearest-even to bf16 in fp32 bits: the interpreter truncates fp32 -> bf16 stores
        # (a GPU rounds), which would double the kernel's error in the tests
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)

    @jit
    def _store(ptr, v, mask, UPCAST: tl.constexpr):
        if UPCAST:
            if ptr.dtype.element_ty == tl.bfloat16:
                v = _round_bf16(v)
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)

    @jit
    def _tile_ptrs(ptr, row0, rows, offs_k, stride, K_CONTIG: tl.constexpr, ALIGNED: tl.constexpr):
        # pointers to an (rows, BLOCK_K) tile of an operand stored row-major (K_CONTIG: rows
        # `stride` apart) or column-major (K steps `stride` apart): the program's first row as a
        # 64-bit scalar, the tile's offsets from it 32-bit (64-bit offset tensors cost a register
        # pair an element and made the epilogue spill). ALIGNED (the launcher checks it): strides
        # and extents multiples of 8 elements, so every 8 elements along the contiguous side
        # start 16-byte aligned and the loads vectorize and pipeline (cp.async).
        if K_CONTIG:
            return ptr + row0.to(tl.int64) * stride + (rows[:, None] * stride + offs_k[None, :])
        if ALIGNED:
            rows = tl.max_contiguous(tl.multiple_of(rows, 8), 8)
        return ptr + row0.to(tl.int64) + (rows[:, None] + offs_k[None, :] * stride)

    @jit
    def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(b), acc)

    @jit
    def _linear_kernel(a_ptr, a2_ptr, b_ptr, b2_ptr, bias_ptr, bias2_ptr, y_ptr, z_ptr, z2_ptr,
                       M, N, K, stride_a, stride_b, alpha, alpha2,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr, A_K_CONTIG: tl.constexpr,
                       B_K_CONTIG: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # z = alpha Σ_k A[m, k] B[n, k] + bias[n], y = act(z); ACT 3 (swiglu) also z2 from the
        # same A and B2; ACT 4 (the backward's dx of swiglu): y = z + z2 with z2 from A2 and B2.
        # y, z, z2 (M, N) contiguous. Program order: GROUP_M row blocks sweep the column blocks
        # together so their B tiles stay in L2 (Triton's matmul tutorial). Rows past M and N
        # wrap around (% M), so the loads need only the K mask; the stores are masked.
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        m0 = (first_m + (pid % (GROUP_M * n_n)) % size_m) * BLOCK_M
        n0 = (pid % (GROUP_M * n_n)) // size_m * BLOCK_N
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if ALIGNED:  # x // 8 * 8 == x here; written so, the compiler knows it (multiple_of on an argument is lost)
            stride_a = stride_a // 8 * 8
            stride_b = stride_b // 8 * 8
            K = K // 8 * 8
        a_ptrs = _tile_ptrs(a_ptr, m0, (m0 + rm) % M - m0, offs_k, stride_a, A_K_CONTIG, ALIGNED)
        a2_ptrs = _tile_ptrs(a2_ptr, m0, (m0 + rm) % M - m0, offs_k, stride_a, A_K_CONTIG, ALIGNED)
        b_ptrs = _tile_ptrs(b_ptr, n0, (n0 + rn) % N - n0, offs_k, stride_b, B_K_CONTIG, ALIGNED)
        b2_ptrs = _tile_ptrs(b2_ptr, n0, (n0 + rn) % N - n0, offs_k, stride_b, B_K_CONTIG, ALIGNED)
        a_step = BLOCK_K if A_K_CONTIG else BLOCK_K * stride_a.to(tl.int64)
        b_step = BLOCK_K if B_K_CONTIG else BLOCK_K * stride_b.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = offs_k[None, :] < K - k0
            a = tl.load(a_ptrs, mask=kmask, other=0.0)
            acc = _dot(a, tl.load(b_ptrs, mask=kmask, other=0.0), acc, IEEE, UPCAST)
            if ACT == 3:  # swiglu's up projection: the same A tile, a second weight
                acc2 = _dot(a, tl.load(b2_ptrs, mask=kmask, other=0.0), acc2, IEEE, UPCAST)
            if ACT == 4:
                acc2 = _dot(tl.load(a2_ptrs, mask=kmask, other=0.0), tl.load(b2_ptrs, mask=kmask, other=0.0),
                            acc2, IEEE, UPCAST)
            a_ptrs += a_step
            a2_ptrs += a_step
            b_ptrs += b_step
            b2_ptrs += b_step
        # epilogue: multiplier, bias, activation in fp32; one rounding per stored tensor
        nmask = n0 + rn < N
        mask = (m0 + rm[:, None] < M) & nmask[None, :]
        base = m0.to(tl.int64) * N + n0
        out = rm[:, None] * N + rn[None, :]
        z = acc * alpha
        z2 = acc2 * alpha2
        if HAS_BIAS:
            z += tl.load(bias_ptr + n0 + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if ACT == 3:
                z2 += tl.load(bias2_ptr + n0 + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if SAVE_Z:
            _store(z_ptr + base + out, z, mask, UPCAST)
            if ACT == 3:
                _store(z2_ptr + base + out, z2, mask, UPCAST)
        _store(y_ptr + base + out, _act_fwd(z, z2, ACT), mask, UPCAST)

    @jit
    def _linear_bwd_act_kernel(dy_ptr, z_ptr, z2_ptr, dz_ptr, dz2_ptr, n, ACT: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK: tl.constexpr):
        # dz = dy · act'(z) elementwise over the n = M·N saved pre-activations (swiglu: dz and dz2)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            t = gelu_tanh_inner(z)
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
            dz = dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du)
        elif ACT == 2:
            dz = tl.where(z > 0.0, dy, 0.0)
        else:  # swiglu: y = z sig(z) z2
            z2 = tl.load(z2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = dy * z2 * sig * (1.0 + z * (1.0 - sig))
            _store(dz2_ptr + offs, dy * z * sig, mask, UPCAST)
        _store(dz_ptr + offs, dz, mask, UPCAST)
