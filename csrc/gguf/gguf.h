// gguf.h — zero-copy GGUF reader: header, metadata, tensor table, all validated against the file.
//
// The file is mmapped read-only; tensor data pointers point into the mapping, so a GgufFile must outlive
// every weight view taken from it. The mapping is registered with map_guard.h, so a file truncated under it
// is an error at the next check_reads instead of SIGBUS. Every length, count, offset and size read from the file is checked
// against the file's size before use: a truncated, corrupt or hostile file gives a tp::Error with
// TP_ERR_FORMAT naming what was wrong, where (byte offset / key / tensor) and expected vs found — never an
// out-of-bounds read. Versions 2 and 3, little-endian only (GGUF_SPEC §1).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common.h"
#include "gguf/map_guard.h"

namespace tp {

enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};

// One metadata value. Scalars are widened (integers into i64/u64, floats into f64); arrays keep their
// element type and hold their elements in the matching vector (nested arrays are rejected).
struct GgufValue {
  GgufValueType type = GgufValueType::U8;
  GgufValueType elem_type = GgufValueType::U8;  // for ARRAY
  int64_t i = 0;       // all signed/unsigned integer types and BOOL (U64 values > INT64_MAX stay in u)
  uint64_t u = 0;
  double f = 0.0;      // F32, F64
  std::string s;       // STRING
  std::vector<int64_t> ai;      // array of integers / bools
  std::vector<double> af;       // array of floats
  std::vector<std::string> as;  // array of strings

  bool is_int() const;        // any integer type (not BOOL)
  bool is_float() const;      // F32 / F64
  bool is_array() const { return type == GgufValueType::ARRAY; }
  int64_t array_size() const;
};

struct GgufTensor {
  std::string name;
  int32_t type = 0;        // ggml type id
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};  // ne[0] innermost (row length), ne[1] rows, ...
  uint64_t offset = 0;     // relative to the data section
  uint64_t nbytes = 0;     // computed from ne and the type's block size
  const uint8_t* data = nullptr;  // points into the mapping

  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GgufFile {
 public:
  // Opens and validates the whole header and tensor table. Throws tp::Error.
  explicit GgufFile(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t file_size() const { return size_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  // Metadata in file order; lookup by key.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;  // nullptr if absent

  // Typed getters: throw TP_ERR_FORMAT naming the key when the value has the wrong type; the *_or
  // variants return the default when the key is absent.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;  // any integer type
  int64_t get_int_or(const std::string& key, int64_t def) const;
  double get_float_or(const std::string& key, double def) const;  // F32/F64 (integers accepted too)

  // Throws TP_ERR_IO when the file has shrunk since it was opened (truncated in place, e.g. by a download
  // that rewrites it), or when check_reads would: callers check before a run that reads tensor data, so
  // that a truncation between runs is an error before any read, and the file can still be restored.
  void check_intact() const;
  // Throws TP_ERR_IO once any read of the mapping has found the file truncated (map_guard.h: the read got
  // zeros instead of SIGBUS). Callers check after each run that read tensor data and discard its results;
  // from then on the mapping holds zeros where the file was missing, so every later check fails too.
  void check_reads() const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;  // nullptr if absent

 private:
  void parse();    // validates header, metadata and tensor table; fills the members below
  void release();  // munmap + close; safe to call twice

  std::string path_;
  int fd_ = -1;
  const uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
  MapFaultFlag read_fault_{0};  // written by the SIGBUS handler (map_guard.h)
  int guard_slot_ = -1;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// The file's header, metadata and tensor table as one JSON object:
// {"path":..., "version":3, "alignment":32, "data_offset":N, "file_size":N,
//  "metadata": {"key": value, ...},   // arrays as JSON arrays; strings JSON-escaped (bytes >= 0x80 as-is)
//  "tensors": [{"name":..., "type":"Q4_K", "type_id":12, "shape":[ne0,ne1,...], "offset":N, "nbytes":N}]}
std::string gguf_describe_json(const GgufFile& f);

}  // namespace tp
