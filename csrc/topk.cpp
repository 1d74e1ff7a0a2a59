#include "topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rankfast {
namespace {

// ---------------------------------------------------------------------------
// Keys: one unsigned integer per entry whose order is the ranking order.
//
// The high half is the score mapped to an order-preserving unsigned integer
// (NaN -> 0, the lowest; -0.0 folded onto +0.0; negated for largest=false);
// the low half is (2^32 - 1 - id), so among equal scores the lower id has the
// larger key. Keys are unique within a row, so heap and nth_element results
// do not depend on the order entries are visited in.
// ---------------------------------------------------------------------------
template <typename T>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  using Bits = uint32_t;
  using Key = uint64_t;
};
template <>
struct KeyTraits<double> {
  using Bits = uint64_t;
  using Key = unsigned __int128;
};

template <typename T, bool Largest>
struct Order {
  using Bits = typename KeyTraits<T>::Bits;
  using Key = typename KeyTraits<T>::Key;
  static constexpr Bits kSign = Bits(1) << (8 * sizeof(Bits) - 1);
  static constexpr uint32_t kIdMask = 0xFFFFFFFFu;

  static Bits score_bits(T v) {
    if (std::isnan(v)) return 0;
    T w = Largest ? v : -v;
    w += T(0);  // -0.0 + 0.0 == +0.0: both zeros get one key
    Bits b;
    std::memcpy(&b, &w, sizeof b);
    return (b & kSign) ? Bits(~b) : Bits(b | kSign);
  }

  // Inverse of score_bits (NaN comes back as a quiet NaN, -0.0 as +0.0): a threshold for the
  // numeric pre-filter, never a returned value (those are read from the input).
  static T score_of_bits(Bits b) {
    if (b == 0) return std::numeric_limits<T>::quiet_NaN();
    Bits raw = (b & kSign) ? Bits(b & ~kSign) : Bits(~b);
    T w;
    std::memcpy(&w, &raw, sizeof w);
    return Largest ? w : -w;
  }

  static Key make(T v, int64_t id) {
    return (Key(score_bits(v)) << 32) | Key(kIdMask - uint32_t(id));
  }
  static Bits bits_of(Key key) { return Bits(key >> 32); }
  static int64_t id_of(Key key) { return int64_t(kIdMask - uint32_t(key & kIdMask)); }

  // Conservative numeric pre-filter: false only for entries that cannot
  // beat a key whose score is t (t not NaN).
  static bool may_beat(T v, T t) { return Largest ? v >= t : v <= t; }

  // First j' >= j at which a block of kBlock entries holds one that may
  // beat t (or the end of the last whole block). 16-byte GCC/Clang vector
  // extensions map onto SSE2/NEON packed compares on every x86-64/arm64.
  typedef T Vec __attribute__((vector_size(16)));
  static constexpr int64_t kLanes = 16 / sizeof(T);
  static constexpr int64_t kBlock = 4 * kLanes;
  static int64_t skip_blocks(const T* x, int64_t j, int64_t n, T t) {
    const Vec threshold = Vec{} + t;
    for (; j + kBlock <= n; j += kBlock) {
      Vec v[4];
      std::memcpy(v, x + j, sizeof v);
      const auto hits = Largest ? ((v[0] >= threshold) | (v[1] >= threshold) | (v[2] >= threshold) |
                                   (v[3] >= threshold))
                                : ((v[0] <= threshold) | (v[1] <= threshold) | (v[2] <= threshold) |
                                   (v[3] <= threshold));
      uint64_t words[2];
      std::memcpy(words, &hits, sizeof words);
      if ((words[0] | words[1]) != 0) break;
    }
    return j;
  }
};

// Where an entry's id comes from, and which entries may be returned.
struct PositionIds {  // select: the id is the column; exclusions by flag
  const uint8_t* excluded;  // null: none excluded
  int64_t id(int64_t j) const { return j; }
  bool eligible(int64_t j) const { return excluded == nullptr || !excluded[j]; }
};
struct GivenIds {  // merge: ids given beside the values; -1 is padding
  const int64_t* ids;
  int64_t id(int64_t j) const { return ids[j]; }
  bool eligible(int64_t j) const { return ids[j] >= 0; }
};

// Per-thread selection state, reused across rows.
//
// Small k: a bounded min-heap of the k best keys. Larger k, rows where the
// heap churns (ascending rows: every entry would enter it), or k a large
// fraction of n: buffered quickselect (append keys that beat the k-th best,
// nth_element back to k when the buffer fills). Both skip whole blocks whose
// scores cannot beat the current bound, using packed compares; quickselect
// over a long run first raises that bound to a floor estimated from a strided
// sample of the run, so sorted rows cost one vectorized pass.
template <typename T, bool Largest>
class RowSelector {
  using O = Order<T, Largest>;
  using Key = typename O::Key;
  static constexpr int64_t kHeapMaxK = 32;
  static constexpr int64_t kSamples = 256;

 public:
  explicit RowSelector(int64_t k) : k_(k), capacity_(std::max<int64_t>(4 * k, 64)) {
    keys_.reserve(capacity_);
    sample_.reserve(kSamples);
  }

  // Selects the best min(k, eligible) entries of x[0:n]; returns their count
  // and leaves their keys in keys_ (best first when `sorted`).
  template <typename Ids>
  int64_t select(const T* x, int64_t n, const Ids& ids, bool sorted) {
    keys_.clear();
    if (k_ == 0) return 0;
    const bool done = (k_ <= kHeapMaxK && 16 * k_ < n) ? heap_select(x, n, ids) : collect(x, 0, n, ids, true);
    if (!done) {  // the sampled floor was too high for this row: once more without it
      keys_.clear();
      collect(x, 0, n, ids, false);
    }
    if (sorted) std::sort(keys_.begin(), keys_.end(), std::greater<Key>());
    return int64_t(keys_.size());
  }

  void write(const T* x, const PositionIds&, int64_t count, T* out_values, int64_t* out_ids) const {
    for (int64_t i = 0; i < count; ++i) {
      out_ids[i] = O::id_of(keys_[i]);
      out_values[i] = x[out_ids[i]];
    }
  }

  // A key holds an id, not a position, and its score bits lose a zero's sign and a NaN's
  // payload: the values come from one more pass over x[0:m], each selected key found again.
  void write(const T* x, const GivenIds& ids, int64_t m, int64_t count, T* out_values, int64_t* out_ids) {
    if (count == 0) return;
    by_key_.resize(count);
    std::iota(by_key_.begin(), by_key_.end(), int64_t(0));
    std::sort(by_key_.begin(), by_key_.end(), [&](int64_t a, int64_t b) { return keys_[a] < keys_[b]; });
    const Key lowest = keys_[by_key_[0]];
    for (int64_t j = 0; j < m; ++j) {
      if (!ids.eligible(j)) continue;
      const Key key = O::make(x[j], ids.id(j));
      if (key < lowest) continue;
      const auto at = std::lower_bound(by_key_.begin(), by_key_.end(), key,
                                       [&](int64_t i, Key k) { return keys_[i] < k; });
      // Equal keys (an id repeated across shards, with one score) all get this entry's value.
      for (auto i = at; i != by_key_.end() && keys_[*i] == key; ++i) out_values[*i] = x[j];
    }
    for (int64_t i = 0; i < count; ++i) out_ids[i] = O::id_of(keys_[i]);
  }

 private:

  // Calls on_key(j, key) for each eligible entry of x[j:n] whose key exceeds
  // bound(), skipping blocks that cannot. on_key may raise the bound, and
  // returns false to stop the scan early; returns where the scan stopped.
  template <typename Ids, typename Bound, typename OnKey>
  static int64_t scan(const T* x, int64_t j, int64_t n, const Ids& ids, Bound bound, OnKey on_key) {
    Key b = bound();
    while (j < n) {
      const bool filter = O::bits_of(b) != 0;  // bound 0 (or a NaN score): no numeric filter
      const T t = O::score_of_bits(O::bits_of(b));
      if (filter) j = O::skip_blocks(x, j, n, t);
      const int64_t end = std::min(n, j + O::kBlock);
      for (; j < end; ++j) {
        if (filter && !O::may_beat(x[j], t)) continue;
        if (!ids.eligible(j)) continue;
        const Key key = O::make(x[j], ids.id(j));
        if (key <= b) continue;
        if (!on_key(j, key)) return j + 1;
        b = bound();
      }
    }
    return j;
  }

  // Returns false only if a sampled floor (in collect) proved too high.
  template <typename Ids>
  bool heap_select(const T* x, int64_t n, const Ids& ids) {
    int64_t inserts = 0;
    bool churning = false;
    auto bound = [&] { return int64_t(keys_.size()) < k_ ? Key(0) : keys_[0]; };
    const int64_t j = scan(x, 0, n, ids, bound, [&](int64_t pos, Key key) {
      if (int64_t(keys_.size()) < k_) {
        keys_.push_back(key);
        if (int64_t(keys_.size()) == k_) std::make_heap(keys_.begin(), keys_.end(), std::greater<Key>());
        return true;
      }
      replace_top(key);
      // Random rows see about k * ln(pos / k) inserts; far more means the row
      // is (nearly) sorted and quickselect with a sampled floor is cheaper.
      churning = ++inserts > 2 * k_ + pos / 8;
      return !churning;
    });
    return churning ? collect(x, j, n, ids, true) : true;
  }

  void replace_top(Key key) {  // sift `key` down from the root of the min-heap
    const int64_t size = int64_t(keys_.size());
    int64_t i = 0;
    for (;;) {
      int64_t child = 2 * i + 1;
      if (child >= size) break;
      if (child + 1 < size && keys_[child + 1] < keys_[child]) ++child;
      if (keys_[child] >= key) break;
      keys_[i] = keys_[child];
      i = child;
    }
    keys_[i] = key;
  }

  // Buffered quickselect over x[j:n], starting from the keys already in
  // keys_. With `use_floor`, entries at or below a floor sampled from the run
  // are skipped; that is exact when at least k kept keys end above the floor,
  // and the return value says whether they did.
  template <typename Ids>
  bool collect(const T* x, int64_t j, int64_t n, const Ids& ids, bool use_floor) {
    const Key floor = use_floor ? sampled_floor(x, j, n, ids) : Key(0);
    Key kth = 0;
    auto shrink = [&] {
      std::nth_element(keys_.begin(), keys_.begin() + (k_ - 1), keys_.end(), std::greater<Key>());
      keys_.resize(k_);
      kth = keys_[k_ - 1];
    };
    if (int64_t(keys_.size()) >= k_) shrink();
    scan(x, j, n, ids, [&] { return std::max(floor, kth); }, [&](int64_t, Key key) {
      keys_.push_back(key);
      if (int64_t(keys_.size()) >= capacity_) shrink();
      return true;
    });
    if (int64_t(keys_.size()) > k_) shrink();
    return floor == 0 ||
           std::count_if(keys_.begin(), keys_.end(), [&](Key key) { return key > floor; }) == k_;
  }

  // A key that about 2k + 4 * (n - j) / kSamples entries of x[j:n] exceed
  // in a row of random order: the r-th best of kSamples strided entries.
  // 0 (no floor) when the run is too short for sampling to pay.
  template <typename Ids>
  Key sampled_floor(const T* x, int64_t j, int64_t n, const Ids& ids) {
    const int64_t run = n - j;
    if (run < 16 * kSamples) return 0;
    const int64_t stride = run / kSamples;
    sample_.clear();
    for (int64_t p = j; p < n; p += stride) {
      if (ids.eligible(p)) sample_.push_back(O::make(x[p], ids.id(p)));
    }
    const int64_t rank = 4 + (2 * k_ + stride - 1) / stride;
    if (rank > int64_t(sample_.size()) / 2) return 0;
    std::nth_element(sample_.begin(), sample_.begin() + (rank - 1), sample_.end(), std::greater<Key>());
    const Key floor = sample_[rank - 1];
    return O::bits_of(floor) == 0 ? Key(0) : floor;
  }

  int64_t k_;
  int64_t capacity_;
  std::vector<Key> keys_;
  std::vector<Key> sample_;
  std::vector<int64_t> by_key_;  // merge: positions in keys_, by key
};

int default_threads(int64_t rows, int64_t n, int requested) {
  int threads = requested;
  if (threads <= 0) {
#ifdef _OPENMP
    threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    // Below ~64k entries per thread, starting threads costs more than it saves.
    const int64_t by_work = std::max<int64_t>(1, rows * n / 65536);
    threads = int(std::min<int64_t>(threads, by_work));
  }
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
}

void check_shape(int64_t rows, int64_t n, int64_t k) {
  if (rows < 0 || n < 0) throw std::invalid_argument("scores: negative dimension");
  if (k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(k));
  if (n > kMaxRowLength)
    throw std::invalid_argument("scores: rows longer than 2^32 - 1 entries are not supported");
}

void check_exclude(int64_t rows, int64_t n, const int64_t* indptr, const int64_t* ids) {
  if (indptr == nullptr) return;
  if (indptr[0] != 0) throw std::invalid_argument("exclude: indptr[0] must be 0");
  for (int64_t r = 0; r < rows; ++r) {
    if (indptr[r + 1] < indptr[r]) throw std::invalid_argument("exclude: indptr must be non-decreasing");
  }
  for (int64_t e = 0; e < indptr[rows]; ++e) {
    if (ids[e] < 0 || ids[e] >= n)
      throw std::invalid_argument("exclude: id " + std::to_string(ids[e]) + " out of range [0, " +
                                  std::to_string(n) + ")");
  }
}

template <typename T>
void pad(int64_t from, int64_t k, bool largest, T* out_values, int64_t* out_ids) {
  const T fill = largest ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity();
  for (int64_t i = from; i < k; ++i) {
    out_values[i] = fill;
    out_ids[i] = -1;
  }
}

template <typename T, bool Largest>
void select_rows(const T* scores, int64_t rows, int64_t n, int64_t k, bool sorted,
                 const int64_t* excl_indptr, const int64_t* excl_ids, T* out_values,
                 int64_t* out_ids, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    RowSelector<T, Largest> selector(std::min(k, n));
    std::vector<uint8_t> excluded(excl_indptr ? n : 0, 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = scores + r * n;
      PositionIds ids{nullptr};
      if (excl_indptr != nullptr && excl_indptr[r + 1] > excl_indptr[r]) {
        for (int64_t e = excl_indptr[r]; e < excl_indptr[r + 1]; ++e) excluded[excl_ids[e]] = 1;
        ids.excluded = excluded.data();
      }
      const int64_t count = selector.select(x, n, ids, sorted);
      selector.write(x, ids, count, out_values + r * k, out_ids + r * k);
      pad(count, k, Largest, out_values + r * k, out_ids + r * k);
      if (ids.excluded != nullptr) {
        for (int64_t e = excl_indptr[r]; e < excl_indptr[r + 1]; ++e) excluded[excl_ids[e]] = 0;
      }
    }
  }
}

template <typename T, bool Largest>
void merge_rows(const T* values, const int64_t* ids, int64_t rows, int64_t m, int64_t k,
                bool sorted, T* out_values, int64_t* out_ids, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    RowSelector<T, Largest> selector(std::min(k, m));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = values + r * m;
      const GivenIds row_ids{ids + r * m};
      const int64_t count = selector.select(x, m, row_ids, sorted);
      selector.write(x, row_ids, m, count, out_values + r * k, out_ids + r * k);
      pad(count, k, Largest, out_values + r * k, out_ids + r * k);
    }
  }
}

}  // namespace

template <typename T>
void select_topk(const T* scores, int64_t rows, int64_t n, int64_t k, bool largest, bool sorted,
                 const int64_t* excl_indptr, const int64_t* excl_ids, T* out_values,
                 int64_t* out_ids, int num_threads) {
  check_shape(rows, n, k);
  check_exclude(rows, n, excl_indptr, excl_ids);
  const int threads = default_threads(rows, n, num_threads);
  auto run = largest ? select_rows<T, true> : select_rows<T, false>;
  run(scores, rows, n, k, sorted, excl_indptr, excl_ids, out_values, out_ids, threads);
}

template <typename T>
void merge_topk(const T* values, const int64_t* ids, int64_t rows, int64_t m, int64_t k,
                bool largest, bool sorted, T* out_values, int64_t* out_ids, int num_threads) {
  check_shape(rows, m, k);
  for (int64_t e = 0; e < rows * m; ++e) {
    if (ids[e] < -1 || ids[e] >= kMaxRowLength)
      throw std::invalid_argument("indices: id " + std::to_string(ids[e]) +
                                  " out of range [-1, 2^32 - 1)");
  }
  const int threads = default_threads(rows, m, num_threads);
  auto run = largest ? merge_rows<T, true> : merge_rows<T, false>;
  run(values, ids, rows, m, k, sorted, out_values, out_ids, threads);
}

template void select_topk<float>(const float*, int64_t, int64_t, int64_t, bool, bool,
                                 const int64_t*, const int64_t*, float*, int64_t*, int);
template void select_topk<double>(const double*, int64_t, int64_t, int64_t, bool, bool,
                                  const int64_t*, const int64_t*, double*, int64_t*, int);
template void merge_topk<float>(const float*, const int64_t*, int64_t, int64_t, int64_t, bool,
                                bool, float*, int64_t*, int);
template void merge_topk<double>(const double*, const int64_t*, int64_t, int64_t, int64_t, bool,
                                 bool, double*, int64_t*, int);

}  // namespace rankfast
