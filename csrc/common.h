// common.h — error type and small helpers shared by every layer of the engine.
//
// The library never aborts: every failure becomes a tp::Error carrying a tp_status and a message a user
// can act on (what, where, expected vs found). api.cpp turns it into a status code + tp_last_error().
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

#include "include/turboprefill.h"

namespace tp {

class Error : public std::runtime_error {
 public:
  Error(tp_status status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
  tp_status status() const { return status_; }

 private:
  tp_status status_;
};

// printf-style formatting into std::string (messages only; never on a hot path).
template <typename... Args>
std::string fmt(const char* f, Args... args) {
  int n = std::snprintf(nullptr, 0, f, args...);
  std::string s(n > 0 ? size_t(n) : 0, '\0');
  if (n > 0) std::snprintf(&s[0], size_t(n) + 1, f, args...);
  return s;
}
inline std::string fmt(const char* f) { return std::string(f); }

// The C ABI's error plumbing, defined in api.cpp, for every file that defines extern "C" entry points:
// the calling thread's tp_last_error() message, and the status of the exception being handled (call it
// only inside a catch block; it records the message too).
void set_last_error(const std::string& msg);
tp_status status_from_current_exception();

template <typename... Args>
[[noreturn]] void fail(tp_status status, const char* f, Args... args) {
  throw Error(status, fmt(f, args...));
}

}  // namespace tp
