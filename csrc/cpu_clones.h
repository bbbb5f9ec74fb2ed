// FASTSSL_VECTOR_CLONES: a function compiled for AVX-512 and AVX2 beside the baseline, the variant
// picked when the library loads (GCC on x86-64). The extension's baseline build targets SSE2 only,
// half the width of the loops torch's own kernels run. Elsewhere (clang, aarch64) it is nothing.
// The extension is built with -ffp-contract=off, so no clone fuses a multiply and an add.
#pragma once

//
// FASTSSL_STREAMING_CLONES: AVX2 beside the baseline, for loops that stream from memory and do little
// work per byte (the EMA): measured on the development machine's AVX-512 CPU, one thread, 6M fp32
// elements from DRAM, the same loop ran 2.79 ms with 512-bit vectors and 2.31 ms with 256-bit ones
// (torch's _foreach_lerp_: 2.33 ms).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSSL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTSSL_STREAMING_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTSSL_VECTOR_CLONES
#define FASTSSL_STREAMING_CLONES
#endif
