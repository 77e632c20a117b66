"""The Triton kernels of fastwidth.kernels.attention, FlashAttention-2 style: the forward (online
softmax, log-sum-exp and per-row max logit out) and the backward's three passes (delta =
rowsum(dO * O), dK/dV a key block over all queries, dQ a pass over keys).

attention.py holds the reference, launchers (tile tables, limits, the AOT table), registered ops,
autograd and the functional, and re-exports these kernels by name (the tests reach them there).
"""

from __future__ import annotations

from fastwidth.kernels._triton import HAS_TRITON, jit, tl

# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @jit
    def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt, T, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # One key tile of the online softmax. MASK: the tile crosses the causal diagonal or the
        # end of the keys; other tiles skip the where() on the (M, N) scores.
        offs_n = n0 + offs_n0
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None],
                     mask=(offs_n[None, :] < T) & dmask[:, None], other=0.0)  # (D, N)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :],
                    mask=(offs_n[:, None] < T) & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, kt, IEEE) * qk_scale
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return acc, m_new, l_i

    @jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mx_ptr,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                         H, G, T, D, qk_scale,
                         CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Online softmax in log2 units (qk_scale = scale * log2 e), as FlashAttention-2.
        # Causal: the last (heaviest) query blocks are launched first; BLOCK_M % BLOCK_N == 0.
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        dmask = offs_d < D
        q_base = q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh
        k_base = k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh
        v_base = v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=(offs_m[:, None] < T) & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if CAUSAL:  # keys below the query block are all visible; the diagonal block is masked
            full_hi = pid_m * BLOCK_M
            hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
        else:  # only the last, partial key tile is masked
            full_hi = (T // BLOCK_N) * BLOCK_N
            hi = T
        for n0 in range(0, full_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt,
                                      T, qk_scale, False, CAUSAL, IEEE, UPCAST)
        for n0 in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt,
                                      T, qk_scale, True, CAUSAL, IEEE, UPCAST)
        o = acc / l_i[:, None]
        rmask = offs_m < T
        row = bh * T + offs_m
        tl.store(o_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=rmask)
        tl.store(mx_ptr + row, m_i / 1.4426950408889634, mask=rmask)

    @jit
    def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, R, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta = rowsum(dO * O) over the R = B*H*T rows of contiguous (B, H, T, D) tensors, in fp32,
        # one pass (FlashAttention-2's backward preprocess)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < R) & (offs_d[None, :] < D)
        off = rows[:, None] * D + offs_d[None, :]
        o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < R)

    @jit
    def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, bh, m0, offs_n, offs_d, dmask, sqt, T, D,
                   qk_scale, MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
        # One query tile against the key block. Padded queries (m >= T) load q = dO = 0 and
        # lse = 0, so they add exactly 0: only causal tiles across the diagonal need MASK.
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < T
        qt = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None],
                     mask=mmask[None, :] & dmask[:, None], other=0.0)  # (D, M)
        do = tl.load(do_base + offs_m[:, None] * D + offs_d[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0)  # (M, D)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        pt = tl.exp2(_dot(k, qt, IEEE) * qk_scale - lse[None, :])  # (N, M)
        if MASK:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
        return dk, dv

    @jit
    def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                              H, G, T, D, qk_scale, scale,
                              CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (key block, batch, kv head); loops over the G query heads sharing
        # it, so grouped-query dk/dv need no atomics and no (B, H, T, D) temporaries.
        # Causal: BLOCK_N % BLOCK_M == 0, so the diagonal is BLOCK_N / BLOCK_M masked tiles.
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        Hkv = H // G
        b = bhk // Hkv
        hk = bhk % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        nmask = offs_n < T
        k = tl.load(k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh + offs_n[:, None] * skt
                    + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh + offs_n[:, None] * svt
                    + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        lo = 0
        full_lo = 0
        if CAUSAL:
            lo = pid_n * BLOCK_N
            full_lo = tl.minimum(T, lo + BLOCK_N)
        for g in range(0, G):
            h = hk * G + g
            bh = b * H + h
            q_base = q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh
            do_base = do_ptr + tl.cast(bh, tl.int64) * T * D
            for m0 in range(lo, full_lo, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, bh, m0, offs_n, offs_d, dmask,
                                    sqt, T, D, qk_scale, True, IEEE, UPCAST, BLOCK_M)
            for m0 in range(full_lo, T, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, bh, m0, offs_n, offs_d, dmask,
                                    sqt, T, D, qk_scale, False, IEEE, UPCAST, BLOCK_M)
        out = tl.cast(bhk, tl.int64) * T * D + offs_n[:, None] * D + offs_d[None, :]
        omask = nmask[:, None] & dmask[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=omask)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=omask)

    @jit
    def _dq_tile(dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt, T, qk_scale,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # One key tile. A padded key (k = v = 0) would add exp2(-lse) * 0, which is NaN when lse
        # is very negative: the last partial tile is masked, as the causal diagonal.
        offs_n = n0 + offs_n0
        nmask = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)  # (N, D)
        vt = tl.load(v_base + offs_n[None, :] * svt + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)  # (D, N)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if MASK:
            keep = nmask[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        ds = p * (_dot(do, vt, IEEE) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
        return dq

    @jit
    def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                            H, G, T, D, qk_scale, scale,
                            CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Causal: heaviest query blocks first, BLOCK_M % BLOCK_N == 0.
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        dmask = offs_d < D
        mmask = offs_m < T
        q = tl.load(q_ptr + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh + offs_m[:, None] * sqt
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        do = tl.load(do_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=mmask, other=0.0)
        k_base = k_ptr + tl.cast(b, tl.int64) * skb + tl.cast(hk, tl.int64) * skh
        v_base = v_ptr + tl.cast(b, tl.int64) * svb + tl.cast(hk, tl.int64) * svh
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if CAUSAL:
            full_hi = pid_m * BLOCK_M
            hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
        else:
            full_hi = (T // BLOCK_N) * BLOCK_N
            hi = T
        for n0 in range(0, full_hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt, T,
                          qk_scale, False, CAUSAL, IEEE, UPCAST)
        for n0 in range(full_hi, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, n0, offs_m, offs_n0, offs_d, dmask, skt, svt, T,
                          qk_scale, True, CAUSAL, IEEE, UPCAST)
        tl.store(dq_ptr + tl.cast(bh, tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
