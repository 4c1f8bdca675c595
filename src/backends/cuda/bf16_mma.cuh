// Shared by the kernels that pack bf16 pairs and multiply on tensor cores (`attention.cu`,
// `qgemm.cu`, `dequant.cu`): the Rust side puts this file before each of them.

// Two floats rounded to nearest even as one bf16 pair, `lo` in the low half.
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c += A · B over one m16n8k16 tile: A's four and B's two fragment registers of bf16 pairs, c's
// four f32 sums (the PTX ISA's fragment layouts for .bf16).
__device__ __forceinline__ void mma(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                                    unsigned int a3, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

