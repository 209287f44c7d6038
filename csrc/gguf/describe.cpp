// describe.cpp — gguf_describe_json: a GgufFile's header, metadata and tensor table as one JSON object.
//
// Built by appending to one reserved std::string (a 262144-entry token array is the common large case).
// Strings are escaped per RFC 8259 with bytes >= 0x80 copied as-is, so the output is UTF-8 exactly when the
// file's strings are (the Python side decodes with surrogateescape). Floats print with %.17g, which
// round-trips any double (F32 values are widened exactly); NaN and Inf have no JSON form and print as null.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "gguf/gguf.h"
#include "quant/types.h"

namespace tp {

namespace {

void put_string(std::string& out, const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  out.push_back('"');
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (ch < 0x20) {
          out += "\\u00";
          out.push_back(hex[ch >> 4]);
          out.push_back(hex[ch & 0xF]);
        } else {
          out.push_back(char(ch));
        }
    }
  }
  out.push_back('"');
}

template <typename T>
void put_int(std::string& out, T v) {
  char buf[24];
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, r.ptr);
}

void put_float(std::string& out, double v) {
  if (!std::isfinite(v)) {
    out += "null";
    return;
  }
  char buf[40];
  int n = std::snprintf(buf, sizeof(buf), "%.17g", v);
  out.append(buf, size_t(n));
  // Keep floats floats for the reader: "1" would parse back as an integer.
  if (!std::memchr(buf, '.', size_t(n)) && !std::memchr(buf, 'e', size_t(n))) out += ".0";
}

void put_value(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::U8: case GgufValueType::U16: case GgufValueType::U32: case GgufValueType::U64:
      put_int(out, v.u);
      return;
    case GgufValueType::I8: case GgufValueType::I16: case GgufValueType::I32: case GgufValueType::I64:
      put_int(out, v.i);
      return;
    case GgufValueType::F32: case GgufValueType::F64: put_float(out, v.f); return;
    case GgufValueType::BOOL: out += v.i ? "true" : "false"; return;
    case GgufValueType::STRING: put_string(out, v.s); return;
    case GgufValueType::ARRAY: break;
  }
  out.push_back('[');
  switch (v.elem_type) {
    case GgufValueType::STRING:
      for (size_t k = 0; k < v.as.size(); ++k) {
        if (k) out.push_back(',');
        put_string(out, v.as[k]);
      }
      break;
    case GgufValueType::F32: case GgufValueType::F64:
      for (size_t k = 0; k < v.af.size(); ++k) {
        if (k) out.push_back(',');
        put_float(out, v.af[k]);
      }
      break;
    case GgufValueType::BOOL:
      for (size_t k = 0; k < v.ai.size(); ++k) {
        if (k) out.push_back(',');
        out += v.ai[k] ? "true" : "false";
      }
      break;
    case GgufValueType::U64:  // stored as the bit pattern in int64 (gguf.cpp); print unsigned
      for (size_t k = 0; k < v.ai.size(); ++k) {
        if (k) out.push_back(',');
        put_int(out, uint64_t(v.ai[k]));
      }
      break;
    default:
      for (size_t k = 0; k < v.ai.size(); ++k) {
        if (k) out.push_back(',');
        put_int(out, v.ai[k]);
      }
      break;
  }
  out.push_back(']');
}

// Rough output size, so the big token arrays append without repeated reallocation.
size_t estimate(const GgufFile& f) {
  size_t n = 256 + f.path().size() + f.tensors().size() * 128;
  for (const auto& kv : f.metadata()) {
    const GgufValue& v = kv.second;
    n += kv.first.size() + 8 + v.s.size() + v.ai.size() * 8 + v.af.size() * 24;
    for (const std::string& s : v.as) n += s.size() + 3;
  }
  return n;
}

}  // namespace

std::string gguf_describe_json(const GgufFile& f) {
  std::string out;
  out.reserve(estimate(f));
  out += "{\"path\":";
  put_string(out, f.path());
  out += ",\"version\":";
  put_int(out, f.version());
  out += ",\"alignment\":";
  put_int(out, f.alignment());
  out += ",\"data_offset\":";
  put_int(out, f.data_offset());
  out += ",\"file_size\":";
  put_int(out, f.file_size());

  out += ",\"metadata\":{";
  bool first = true;
  for (const auto& kv : f.metadata()) {
    if (!first) out.push_back(',');
    first = false;
    put_string(out, kv.first);
    out.push_back(':');
    put_value(out, kv.second);
  }

  out += "},\"tensors\":[";
  first = true;
  for (const GgufTensor& t : f.tensors()) {
    if (!first) out.push_back(',');
    first = false;
    out += "{\"name\":";
    put_string(out, t.name);
    out += ",\"type\":";
    put_string(out, type_traits(t.type).name);
    out += ",\"type_id\":";
    put_int(out, t.type);
    out += ",\"shape\":[";
    for (int d = 0; d < t.n_dims; ++d) {
      if (d) out.push_back(',');
      put_int(out, t.ne[d]);
    }
    out += "],\"offset\":";
    put_int(out, t.offset);
    out += ",\"nbytes\":";
    put_int(out, t.nbytes);
    out.push_back('}');
  }
  out += "]}";
  return out;
}

}  // namespace tp
