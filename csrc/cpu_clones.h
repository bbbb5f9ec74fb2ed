// FASTSSL_VECTOR_CLONES: a function compiled for AVX-512 and AVX2 beside the baseline, the variant
// picked when the library loads (GCC on x86-64). The extension's baseline build targets SSE2 only,
// half the width of the loops torch's own kernels run. Elsewhere (clang, aarch64) it is nothing.
// The extension is built with -ffp-contract=off, so no clone fuses a multiply and an add.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSSL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSSL_VECTOR_CLONES
#endif
