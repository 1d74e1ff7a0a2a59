// pybind11 bindings of the top-K selector: numpy buffers in, numpy arrays out.
// Argument checking that needs Python types lives in rankfast/selection.py; the
// checks here keep direct callers from reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>

#include "topk.h"

namespace py = pybind11;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

template <typename T>
py::tuple topk(const Array<T>& scores, int64_t k, bool largest, bool sorted,
               const std::optional<Array<int64_t>>& excl_indptr,
               const std::optional<Array<int64_t>>& excl_ids, int num_threads) {
  if (scores.ndim() != 2) throw std::invalid_argument("scores: expected a 2-D array");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  const int64_t rows = scores.shape(0), n = scores.shape(1);
  const int64_t* indptr = nullptr;
  const int64_t* ids = nullptr;
  if (excl_indptr.has_value() != excl_ids.has_value())
    throw std::invalid_argument("exclude: give both indptr and indices, or neither");
  if (excl_indptr) {
    if (excl_indptr->ndim() != 1 || excl_indptr->shape(0) != rows + 1)
      throw std::invalid_argument("exclude: indptr must have rows + 1 entries");
    if (excl_ids->ndim() != 1) throw std::invalid_argument("exclude: indices must be 1-D");
    indptr = excl_indptr->data();
    ids = excl_ids->data();
    if (indptr[rows] > excl_ids->shape(0))
      throw std::invalid_argument("exclude: indptr[-1] exceeds the number of indices");
  }
  Array<T> values({rows, k});
  Array<int64_t> out_ids({rows, k});
  T* values_ptr = values.mutable_data();
  int64_t* ids_ptr = out_ids.mutable_data();
  {
    py::gil_scoped_release release;
    rankfast::select_topk<T>(scores.data(), rows, n, k, largest, sorted, indptr, ids, values_ptr,
                             ids_ptr, num_threads);
  }
  return py::make_tuple(values, out_ids);
}

template <typename T>
py::tuple merge(const Array<T>& values, const Array<int64_t>& ids, int64_t k, bool largest,
                bool sorted, int num_threads) {
  if (values.ndim() != 2 || ids.ndim() != 2 || values.shape(0) != ids.shape(0) ||
      values.shape(1) != ids.shape(1))
    throw std::invalid_argument("values and indices must be 2-D arrays of the same shape");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  const int64_t rows = values.shape(0), m = values.shape(1);
  Array<T> out_values({rows, k});
  Array<int64_t> out_ids({rows, k});
  T* values_ptr = out_values.mutable_data();
  int64_t* ids_ptr = out_ids.mutable_data();
  {
    py::gil_scoped_release release;
    rankfast::merge_topk<T>(values.data(), ids.data(), rows, m, k, largest, sorted, values_ptr,
                            ids_ptr, num_threads);
  }
  return py::make_tuple(out_values, out_ids);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rankfast C++ extension: multi-threaded top-K selection and merging";
  m.def("topk", &topk<float>, py::arg("scores").noconvert(), py::arg("k"), py::arg("largest"),
        py::arg("sorted"), py::arg("excl_indptr"), py::arg("excl_indices"),
        py::arg("num_threads"), "Row-wise top-k of a C-contiguous float32 [rows, n] array.");
  m.def("topk", &topk<double>, py::arg("scores").noconvert(), py::arg("k"), py::arg("largest"),
        py::arg("sorted"), py::arg("excl_indptr"), py::arg("excl_indices"),
        py::arg("num_threads"), "Row-wise top-k of a C-contiguous float64 [rows, n] array.");
  m.def("merge", &merge<float>, py::arg("values").noconvert(), py::arg("indices").noconvert(),
        py::arg("k"), py::arg("largest"), py::arg("sorted"), py::arg("num_threads"),
        "Merges concatenated per-shard top-k lists (float32).");
  m.def("merge", &merge<double>, py::arg("values").noconvert(), py::arg("indices").noconvert(),
        py::arg("k"), py::arg("largest"), py::arg("sorted"), py::arg("num_threads"),
        "Merges concatenated per-shard top-k lists (float64).");
  m.attr("kMaxRowLength") = rankfast::kMaxRowLength;
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
