// Top-K selection over rows of scores, and merging of per-shard top-K lists.
//
// Semantics (shared with the Python fallback in rankfast/selection.py):
//   * NaN ranks below every number; -0.0 and +0.0 tie;
//   * ties go to the lower id, so results are deterministic;
//   * a row with fewer than k eligible entries is padded with id -1 and
//     value -inf (+inf when largest == false);
//   * excluded entries (and, when merging, entries with id -1) are never returned.
//
// No Python or torch types here: plain pointers to contiguous row-major data.
#pragma once

#include <cstdint>

namespace rankfast {

// Row ids must fit in 32 bits (they are packed beside the score in one key).
constexpr int64_t kMaxRowLength = 0xFFFFFFFFLL;

// scores: [rows, n]; out_values/out_ids: [rows, k].
// excl_indptr ([rows + 1]) and excl_ids (CSR column ids) may both be null.
// num_threads <= 0 picks a default from the work size and the OpenMP runtime.
template <typename T>
void select_topk(const T* scores, int64_t rows, int64_t n, int64_t k, bool largest, bool sorted,
                 const int64_t* excl_indptr, const int64_t* excl_ids, T* out_values,
                 int64_t* out_ids, int num_threads);

// values/ids: [rows, m], the concatenated per-shard lists (ids are global
// item ids; -1 marks padding). out_values/out_ids: [rows, k].
template <typename T>
void merge_topk(const T* values, const int64_t* ids, int64_t rows, int64_t m, int64_t k,
                bool largest, bool sorted, T* out_values, int64_t* out_ids, int num_threads);

}  // namespace rankfast
