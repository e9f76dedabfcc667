// A small test harness for the C++ unit tests, with no dependency (built only with -DGEMMALENS_BUILD_TESTS=ON):
//   TEST(name) { ... }            registers a case; `gemmalens_ops_test [--list] [name-part ...]` runs the cases
//                                 whose name contains any of the arguments (all without arguments).
//   CHECK(cond), CHECK_EQ(a, b)   record a failure with file:line and the values, and the case goes on.
//   CHECK_NEAR(a, b, tol)         |a - b| <= tol.
//   CHECK_CLOSE(got, want, n, atol, rtol)   n values, |got - want| <= atol + rtol |want|; reports the worst one.
//   CHECK_WITHIN(got, want, n, tol)         n values, |got[i] - want[i]| <= tol[i]; reports the worst one.
//   CHECK_THROWS(expr, Type)      expr throws a Type.
//   INFO(...)                     describes what the checks below it in the same scope are about (the values of
//                                 a parametrised loop); printed with every failure.
//   SKIP(...)                     ends the case as skipped, saying why (a CPU feature this machine lacks).
//   NOTE(...)                     prints a line under the case (a variant that could not run here).
// Exit status: 0 when every selected case passed or was skipped, 1 on any failure, 2 on bad arguments.
#pragma once
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace gemmalens::test {

struct Case {
  const char* name;
  void (*fn)();
};
std::vector<Case>& registry();
struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Records one failure of the running case (printed with the INFO lines in scope).
void fail(const char* file, int line, const std::string& what);
void note(const std::string& what);
struct Skipped {
  std::string why;
};

// The INFO stack.
struct Info {
  explicit Info(std::string s);
  ~Info();
  Info(const Info&) = delete;
  Info& operator=(const Info&) = delete;
};

template <class... A>
std::string str(const A&... a) {
  std::ostringstream o;
  o.precision(9);
  (o << ... << a);
  return o.str();
}

// The CHECK_CLOSE / CHECK_WITHIN comparison: false (and one failure naming the worst element) when any value is
// further than tol(i, want) from its reference, or NaN.
template <class G, class W, class Tol>
bool check_within(const char* file, int line, const char* what, const G* got, const W* want, int64_t n, Tol tol) {
  int64_t bad = 0, worst = -1;
  double worst_excess = 0, worst_tol = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]), t = tol(i, w);
    const double err = std::fabs(g - w);
    if (g == w || err <= t) continue;  // g == w: equal infinities
    ++bad;
    const double excess = std::isnan(err) ? INFINITY : err - t;
    if (worst < 0 || excess > worst_excess) worst = i, worst_excess = excess, worst_tol = t;
  }
  if (bad == 0) return true;
  const double g = static_cast<double>(got[worst]), w = static_cast<double>(want[worst]);
  fail(file, line, str(what, ": ", bad, " of ", n, " values off; worst [", worst, "]: got ", g, ", want ", w, ", |diff| ",
                       std::fabs(g - w), " > tolerance ", worst_tol));
  return false;
}

}  // namespace gemmalens::test

#define GL_CAT2(a, b) a##b
#define GL_CAT(a, b) GL_CAT2(a, b)

#define TEST(name)                                                                       \
  static void gl_test_##name();                                                          \
  static const ::gemmalens::test::Register gl_register_##name(#name, &gl_test_##name);  \
  static void gl_test_##name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) ::gemmalens::test::fail(__FILE__, __LINE__, "CHECK(" #cond ")");   \
  } while (0)

#define CHECK_EQ(a, b)                                                                                              \
  do {                                                                                                              \
    const auto& gl_a = (a);                                                                                         \
    const auto& gl_b = (b);                                                                                         \
    if (!(gl_a == gl_b))                                                                                            \
      ::gemmalens::test::fail(__FILE__, __LINE__, ::gemmalens::test::str("CHECK_EQ(" #a ", " #b "): ", gl_a, " != ", gl_b)); \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                                   \
  do {                                                                                                          \
    const double gl_a = (a), gl_b = (b), gl_t = (tol);                                                          \
    if (!(std::fabs(gl_a - gl_b) <= gl_t))                                                                      \
      ::gemmalens::test::fail(__FILE__, __LINE__,                                                               \
                              ::gemmalens::test::str("CHECK_NEAR(" #a ", " #b ", " #tol "): ", gl_a, " vs ", gl_b, \
                                                     ", |diff| ", std::fabs(gl_a - gl_b), " > ", gl_t));        \
  } while (0)

#define CHECK_CLOSE(got, want, n, atol, rtol)                                                          \
  ::gemmalens::test::check_within(__FILE__, __LINE__, "CHECK_CLOSE(" #got ", " #want ")", got, want, n, \
                                  [&](int64_t, double gl_w) { return (atol) + (rtol) * std::fabs(gl_w); })
#define CHECK_WITHIN(got, want, n, tol)                                                                 \
  ::gemmalens::test::check_within(__FILE__, __LINE__, "CHECK_WITHIN(" #got ", " #want ")", got, want, n, \
                                  [&](int64_t gl_i, double) { return static_cast<double>((tol)[gl_i]); })

#define CHECK_THROWS(expr, Type)                                                                                   \
  do {                                                                                                             \
    bool gl_thrown = false;                                                                                        \
    try {                                                                                                          \
      (void)(expr);                                                                                                \
    } catch (const Type&) {                                                                                        \
      gl_thrown = true;                                                                                            \
    } catch (const std::exception& e) {                                                                            \
      ::gemmalens::test::fail(__FILE__, __LINE__, ::gemmalens::test::str("CHECK_THROWS(" #expr ", " #Type "): threw another exception: ", e.what())); \
      gl_thrown = true;                                                                                            \
    }                                                                                                              \
    if (!gl_thrown) ::gemmalens::test::fail(__FILE__, __LINE__, "CHECK_THROWS(" #expr ", " #Type "): nothing thrown"); \
  } while (0)

#define INFO(...) const ::gemmalens::test::Info GL_CAT(gl_info_, __LINE__)(::gemmalens::test::str(__VA_ARGS__))
#define NOTE(...) ::gemmalens::test::note(::gemmalens::test::str(__VA_ARGS__))
#define SKIP(...) throw ::gemmalens::test::Skipped{::gemmalens::test::str(__VA_ARGS__)}
