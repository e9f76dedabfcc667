// Kernels that take their count of activation / query rows as a template argument (so that their accumulators stay
// in registers) walk a run-time number of rows with row_groups.
#pragma once
#include <cstdint>
#include <type_traits>

namespace gemmalens::ops {

// Rows [0, M) in groups of G, the rest (M % G) as one smaller group: f(std::integral_constant<int, rows>, m0).
template <int MB, int G, class F>
inline void rest_group(int64_t r, int64_t m, F& f) {
  if constexpr (MB < G) {
    if (r == MB)
      f(std::integral_constant<int, MB>{}, m);
    else
      rest_group<MB + 1, G>(r, m, f);
  }
}
template <int G, class F>
inline void row_groups(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + G <= M; m += G) f(std::integral_constant<int, G>{}, m);
  rest_group<1, G>(M - m, m, f);
}

}  // namespace gemmalens::ops
