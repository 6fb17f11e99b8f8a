#!/usr/bin/env python3
"""Checks the index math of src/ops/cuda/grouped_gemm.cu without a GPU (pure Python, ~5 s).

Emulates grouped_mma_kernel block by block for each tile configuration and product (NT, NN, TN):
the device-side tile schedule (find_row_tile), the zero-filled cp.async tile loads, the ldmatrix
row addresses of the A and B fragments (ldmatrix and mma.sync m16n8k16 semantics as in the PTX
ISA), the epilogue's masks and the row splits of the K-grouped product, and compares the result
with a plain loop over experts. Shared memory starts as NaN, so a fragment read of a byte no
load wrote reaches the output and fails. Keep the formulas in step with the kernel when editing
it: this is the check that can run on the development machine; tests/test_cuda_grouped_gemm.cpp
is the real one (GPU).

Usage: python3 tools/grouped_gemm_index_sim.py   (prints one line per case, then ALL OK)
"""
import random
random.seed(0)
NAN = float('nan')

def ldmatrix(smem, addrs, trans):
    regs = [[None]*4 for _ in range(32)]
    for i in range(4):
        M = [smem[addrs[8*i+j]: addrs[8*i+j]+8] for j in range(8)]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            regs[lane][i] = (M[g][2*t], M[g][2*t+1]) if not trans else (M[2*t][g], M[2*t+1][g])
    return regs

def amat(a):
    A = [[NAN]*16 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g][2*t:2*t+2] = a[lane][0]; A[g+8][2*t:2*t+2] = a[lane][1]
        A[g][2*t+8:2*t+10] = a[lane][2]; A[g+8][2*t+8:2*t+10] = a[lane][3]
    return A

def bmat(b0, b1):
    B = [[NAN]*8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        B[2*t][g], B[2*t+1][g] = b0[lane]; B[2*t+8][g], B[2*t+9][g] = b1[lane]
    return B

def matmul_add(C, A, B):
    for i in range(16):
        Ai = A[i]
        for j in range(8):
            C[i][j] += sum(Ai[k]*B[k][j] for k in range(16))

def load_tile(s, kmajor, R, BK, g, goff, ld, o0, o_end, k0, k_end):
    if not kmajor:
        CPR = BK // 8
        for i in range(R * CPR):
            r, c = i // CPR, (i % CPR) * 8
            o, k = o0 + r, k0 + c
            ok = o < o_end and k < k_end
            s[r*(BK+8)+c: r*(BK+8)+c+8] = g[goff+o*ld+k: goff+o*ld+k+8] if ok else [0.0]*8
    else:
        CPR = R // 8
        for i in range(BK * CPR):
            r, c = i // CPR, (i % CPR) * 8
            k, o = k0 + r, o0 + c
            ok = o < o_end and k < k_end
            s[r*(R+8)+c: r*(R+8)+c+8] = g[goff+k*ld+o: goff+k*ld+o+8] if ok else [0.0]*8

def a_addrs(kmajor, BM, BK, mm, kk):
    if not kmajor: return [(mm + (l & 15)) * (BK + 8) + kk + (l >> 4) * 8 for l in range(32)]
    return [(kk + (l & 7) + (l >> 4) * 8) * (BM + 8) + mm + ((l >> 3) & 1) * 8 for l in range(32)]

def b_addrs(kmajor, BN, BK, nn, kk):
    if not kmajor: return [(nn + (l & 7) + (l >> 4) * 8) * (BK + 8) + kk + ((l >> 3) & 1) * 8 for l in range(32)]
    return [(kk + (l & 7) + ((l >> 3) & 1) * 8) * (BN + 8) + nn + (l >> 4) * 8 for l in range(32)]

def block(cfg, mode, a, e, m0, n0, kbeg, kend, opA, opB, out, part_idx=None):
    BM, BN, BK, WM, WN = cfg
    AK, BKM = mode == 'TN', mode != 'NT'
    WTM, WTN = BM // WM, BN // WN
    MI, NI = WTM // 16, WTN // 8
    acc = {(w, i, j): [[0.0]*8 for _ in range(16)] for w in range(WM*WN) for i in range(MI) for j in range(NI)}
    kt_n = (kend - kbeg + BK - 1) // BK
    for kt in range(kt_n):
        k0 = kbeg + kt * BK
        sA = [NAN]*(BK*(BM+8) if AK else BM*(BK+8)); sB = [NAN]*(BK*(BN+8) if BKM else BN*(BK+8))
        load_tile(sA, AK, BM, BK, *opA, k0, kend)
        load_tile(sB, BKM, BN, BK, *opB, k0, kend)
        for w in range(WM * WN):
            wm, wn = (w // WN) * WTM, (w % WN) * WTN
            for kk in range(0, BK, 16):
                af = [amat(ldmatrix(sA, a_addrs(AK, BM, BK, wm + i*16, kk), AK)) for i in range(MI)]
                bf = [ldmatrix(sB, b_addrs(BKM, BN, BK, wn + j*16, kk), BKM) for j in range(NI // 2)]
                for i in range(MI):
                    for j in range(NI):
                        r = bf[j // 2]
                        matmul_add(acc[w, i, j], af[i], bmat([x[(j & 1)*2] for x in r], [x[(j & 1)*2+1] for x in r]))
    for w in range(WM * WN):
        wm, wn = (w // WN) * WTM, (w % WN) * WTN
        for i in range(MI):
            for j in range(NI):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for h in range(2):
                        m = m0 + wm + i*16 + g + 8*h
                        if m >= opA[4]: continue
                        n = n0 + wn + j*8 + 2*t
                        if n >= a['Nc']: continue
                        v = acc[w, i, j][g + 8*h][2*t: 2*t+2]
                        assert all(x == x for x in v), 'NaN reached the output'
                        for q in range(2):
                            if mode != 'TN':
                                idx = m*a['Nc']+n+q
                                out[idx] = a['alpha']*v[q] + (out[idx] if a['acc'] else 0)
                            elif part_idx is None:
                                out[(e*a['Mc']+m)*a['Nc']+n+q] += a['alpha']*v[q]
                            else:
                                out[((part_idx*a['E']+e)*a['Mc']+m)*a['Nc']+n+q] = v[q]

def find_row_tile(off, E, mt, BM):
    before = 0
    for base in range(0, E, 32):
        tiles = [((off[e+1]-off[e]+BM-1)//BM if e < E else 0) for e in range(base, base+32)]
        inc, s = [], 0
        for x in tiles: s += x; inc.append(s)
        excl = [before + inc[l] - tiles[l] for l in range(32)]
        hits = [l for l in range(32) if tiles[l] > 0 and excl[l] <= mt < before + inc[l]]
        if hits: return base + hits[0], mt - excl[hits[0]]
        before += inc[31]
    return -1, 0

def rows_grouped(cfg, mode, X, W, off, T, E, N, K, alpha, accf, Y):
    BM, BN = cfg[0], cfg[1]
    Nc, Kc = (N, K) if mode == 'NT' else (K, N)
    lda, ldb = (K, K) if mode == 'NT' else (N, K)
    a = dict(Nc=Nc, alpha=alpha, acc=accf)
    n_tiles = (Nc + BN - 1)//BN
    blocks = ((T + BM - 1)//BM + E) * n_tiles
    seen = 0
    for b in range(blocks):
        mt, n0 = b // n_tiles, (b % n_tiles) * BN
        e, tile = find_row_tile(off, E, mt, BM)
        if e < 0: continue
        seen += 1
        m0 = off[e] + tile*BM
        block(cfg, mode, a, e, m0, n0, 0, Kc, (X, 0, lda, m0, off[e+1]), (W, e*N*K, ldb, n0, Nc), Y)
    return seen

def kgrouped(cfg, X, dY, off, T, E, M, N, scale, Out, splits):
    BM, BN, BK = cfg[0], cfg[1], cfg[2]
    a = dict(Nc=N, Mc=M, E=E, alpha=scale)
    mt_n, nt_n = (M+BM-1)//BM, (N+BN-1)//BN
    part = [NAN]*(splits*E*M*N) if splits > 1 else None
    for bid in range(E*mt_n*nt_n):
        for sy in range(splits):
            idd = bid; n0 = (idd % nt_n)*BN; idd //= nt_n; m0 = (idd % mt_n)*BM; e = idd // mt_n
            r0, r1 = off[e], off[e+1]
            per = ((r1-r0+splits-1)//splits + BK-1)//BK*BK
            kbeg = min(r1, r0 + sy*per); kend = min(r1, kbeg+per)
            if splits == 1 and kend <= kbeg: continue
            block(cfg, 'TN', a, e, m0, n0, kbeg, kend, (X, 0, M, m0, M), (dY, 0, N, n0, N),
                  part if splits > 1 else Out, sy if splits > 1 else None)
    if splits > 1:
        n = E*M*N
        for i in range(n):
            Out[i] += scale * sum(part[p*n+i] for p in range(splits))

def offsets(T, E, kind):
    cnt = [0]*E
    used = T - min(T, 5) if kind == 'tail' else T
    for r in range(used):
        e = random.randrange(E)
        if kind == 'empties': e = (e//3)*3
        if kind == 'one': e = E//2
        cnt[e] += 1
    off = [0]
    for c in cnt: off.append(off[-1]+c)
    return off

def randn(n): return [random.gauss(0, 1) for _ in range(n)]

def check(cfg, mode, T, E, N, K, kind):
    off = offsets(T, E, kind)
    W = randn(E*N*K)
    inw, outw = (K, N) if mode == 'NT' else (N, K)
    X = randn(T*inw); Y0 = randn(T*outw)
    for accf in (False, True):
        Y = list(Y0); rows_grouped(cfg, mode, X, W, off, T, E, N, K, 0.5, accf, Y)
        err = 0.0
        for r in range(T):
            e = next((e for e in range(E) if off[e] <= r < off[e+1]), -1)
            for c in range(outw):
                if e < 0: ref = Y0[r*outw+c]
                else:
                    if mode == 'NT': s = sum(X[r*K+k]*W[e*N*K+c*K+k] for k in range(K))
                    else: s = sum(X[r*N+n]*W[e*N*K+n*K+c] for n in range(N))
                    ref = 0.5*s + (Y0[r*outw+c] if accf else 0)
                err = max(err, abs(Y[r*outw+c]-ref))
        print(mode, cfg, T, E, N, K, kind, accf, 'err', err, flush=True); assert err < 1e-9

def check_tn(cfg, T, E, M, N, kind, splits):
    off = offsets(T, E, kind)
    X = randn(T*M); dY = randn(T*N); O0 = randn(E*M*N)
    O = list(O0); kgrouped(cfg, X, dY, off, T, E, M, N, 0.75, O, splits)
    err = 0.0
    for e in range(E):
        for m in range(M):
            for n in range(N):
                ref = O0[(e*M+m)*N+n] + 0.75*sum(X[r*M+m]*dY[r*N+n] for r in range(off[e], off[e+1]))
                err = max(err, abs(O[(e*M+m)*N+n]-ref))
    print('TN', cfg, T, E, M, N, kind, splits, 'err', err, flush=True); assert err < 1e-9

Big = (128, 128, 32, 2, 2); Short = (64, 128, 32, 2, 2); ThinN = (128, 32, 32, 4, 1); ThinM = (32, 128, 32, 1, 4)
check(ThinN, 'NT', 37, 3, 16, 40, 'empties')
check(Short, 'NT', 90, 3, 136, 48, 'tail')
check(ThinN, 'NN', 60, 3, 24, 16, 'one')
check_tn(ThinM, 60, 3, 16, 136, 'random', 1)
check_tn(ThinN, 60, 3, 136, 16, 'empties', 1)
check_tn(Big, 100, 2, 136, 24, 'tail', 3)
check(Short, 'NN', 90, 3, 40, 136, 'random')
check(Big, 'NT', 150, 2, 136, 40, 'random')
check(Big, 'NN', 140, 2, 48, 136, 'empties')
check(ThinN, 'NT', 40, 3, 12, 16, 'random')
check(Short, 'NT', 90, 3, 70, 24, 'one')
Wide = (128, 256, 32, 2, 4)
check(Wide, 'NT', 150, 2, 264, 40, 'tail')
check(Wide, 'NN', 140, 2, 40, 264, 'empties')
print('ALL OK')
