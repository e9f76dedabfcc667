// The test runner: `gemmalens_ops_test [--list] [name-part ...]` (see test.h).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>

#include "ops/cpu.h"
#include "tests/test.h"

namespace gemmalens::test {

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

namespace {
std::vector<std::string>& info_stack() {
  static std::vector<std::string> s;
  return s;
}
int g_failures = 0;         // of the running case
constexpr int kMaxPrinted = 10;  // failures printed per case (a broken kernel fails every configuration)
}  // namespace

Info::Info(std::string s) { info_stack().push_back(std::move(s)); }
Info::~Info() { info_stack().pop_back(); }

void fail(const char* file, int line, const std::string& what) {
  if (++g_failures > kMaxPrinted) return;
  std::printf("  %s:%d: %s\n", file, line, what.c_str());
  for (const std::string& s : info_stack()) std::printf("    with %s\n", s.c_str());
  if (g_failures == kMaxPrinted) std::printf("  (further failures of this case are counted, not printed)\n");
}

void note(const std::string& what) { std::printf("  note: %s\n", what.c_str()); }

}  // namespace gemmalens::test

int main(int argc, char** argv) {
  using namespace gemmalens::test;
  std::vector<std::string> wanted;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list") == 0)
      list = true;
    else if (argv[i][0] == '-') {
      std::printf("usage: %s [--list] [name-part ...]  (runs the cases whose name contains a name-part; all by default)\n", argv[0]);
      return 2;
    } else
      wanted.emplace_back(argv[i]);
  }
  std::vector<const Case*> run;
  for (const Case& c : registry()) {
    bool take = wanted.empty();
    for (const std::string& w : wanted) take = take || std::string(c.name).find(w) != std::string::npos;
    if (take) run.push_back(&c);
  }
  if (run.empty()) {
    std::printf("no test case matches; --list shows them\n");
    return 2;
  }
  if (list) {
    for (const Case* c : run) std::printf("%s\n", c->name);
    return 0;
  }
  int passed = 0, failed = 0, skipped = 0;
  // The kernels' CPU class (GEMMALENS_MAX_ISA forces a lower one; tests/test_cpp_units.py runs each).
  std::printf("CPU class: %s\n", gemmalens::ops::cpu_class_name(gemmalens::ops::cpu_class()));
  const auto t_all = std::chrono::steady_clock::now();
  for (const Case* c : run) {
    std::printf("[ RUN  ] %s\n", c->name);
    std::fflush(stdout);
    g_failures = 0;
    const auto t0 = std::chrono::steady_clock::now();
    bool skip = false;
    try {
      c->fn();
    } catch (const Skipped& s) {
      std::printf("  skipped: %s\n", s.why.c_str());
      skip = true;
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, str("uncaught exception: ", e.what()));
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const char* verdict = g_failures ? "FAIL" : skip ? "SKIP" : "OK";
    if (g_failures) {
      ++failed;
      std::printf("  %d failure(s)\n", g_failures);
    } else if (skip) {
      ++skipped;
    } else {
      ++passed;
    }
    std::printf("[ %-4s ] %s (%.0f ms)\n", verdict, c->name, ms);
    std::fflush(stdout);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  std::printf("%d passed, %d failed, %d skipped in %.2f s\n", passed, failed, skipped, s);
  return failed ? 1 : 0;
}
