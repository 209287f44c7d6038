// ring_stress_main.cpp — standalone ring stress test, built with -fsanitize=thread in CI
// (cmake -DTP_BUILD_TESTS=ON -DTP_TSAN=ON). Exits non-zero on any hand-off error.
#include <cstdio>
#include <cstdlib>

#include "pipeline/ring_stress.h"

int main(int argc, char** argv) {
  const long long items = argc > 1 ? std::atoll(argv[1]) : 1000000;
  long long total = 0;
  const int caps[] = {1, 2, 3, 7};
  const long long delays[] = {0, 2000};
  for (int cap : caps) {
    for (long long d : delays) {
      const long long n = d ? items / 20 : items;
      const long long e = tp::ring_stress(cap, n, d, 12345 + cap);
      std::printf("capacity %d, %lld items, max delay %lld ns: %lld errors\n", cap, n, d, e);
      total += e;
    }
  }
  std::printf("%s\n", total == 0 ? "ring stress: OK" : "ring stress: FAILED");
  return total == 0 ? 0 : 1;
}
