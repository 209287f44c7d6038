// gguf.cpp — GgufFile: mmap a GGUF file and validate its header, metadata and tensor table (GGUF_SPEC §1).
//
// Everything is read through Cursor, which checks each read against the bytes left in the file before
// touching memory. Counts and lengths (n_kv, n_tensors, string lengths, array counts) are compared with the
// remaining bytes *before* anything is allocated for them, so a hostile 2^62 count is a clean
// TP_ERR_FORMAT rather than bad_alloc. Multi-byte fields are memcpy'd as host order: the reader only runs on
// little-endian hosts (asserted below) and rejects foreign-endian files by their version field.
#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "quant/types.h"
#include "testing/fault_inject.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the GGUF reader assumes a little-endian host");

namespace tp {

namespace {

using ull = unsigned long long;  // for %llu in messages

constexpr uint64_t kMaxTensorName = 64;                      // GGML_MAX_NAME, including the NUL ggml appends
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;                  // key length, value type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name length, n_dims, ne[0], type, offset
constexpr uint32_t kTypeCount = 13;

const char* value_type_name(uint32_t t) {
  static const char* const names[kTypeCount] = {"U8",  "I8",     "U16",   "I16", "U32", "I32", "F32",
                                                "BOOL", "STRING", "ARRAY", "U64", "I64", "F64"};
  return t < kTypeCount ? names[t] : "unknown";
}

// Smallest encoded size of one value of a (non-array) type: how many elements the rest of the file can
// possibly hold, used to cap array counts before reserving.
uint64_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8: case GgufValueType::I8: case GgufValueType::BOOL: return 1;
    case GgufValueType::U16: case GgufValueType::I16: return 2;
    case GgufValueType::U32: case GgufValueType::I32: case GgufValueType::F32: return 4;
    case GgufValueType::U64: case GgufValueType::I64: case GgufValueType::F64: return 8;
    case GgufValueType::STRING: return 8;  // the length prefix alone
    case GgufValueType::ARRAY: return 12;  // element type + count
  }
  return 1;
}

// Bounds-checked sequential reader over the mapping. `where` names the item being read (set by the caller
// once per key or tensor, so the hot array loops build no strings); `elem` >= 0 adds an array index.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* base, uint64_t size)
      : path_(path), base_(base), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  void need(uint64_t n) const {
    if (n > remaining()) {
      std::string w = where;
      if (elem >= 0) w += fmt(" element %lld", (long long)elem);
      fail(TP_ERR_FORMAT,
           "%s: truncated file: %s needs %llu bytes at offset %llu but the file has %llu bytes",
           path_.c_str(), w.c_str(), ull(n), ull(pos_), ull(size_));
    }
  }

  template <typename T>
  T read() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  // u64 length + bytes. The length is checked against the file before the string is allocated.
  std::string read_string() {
    uint64_t len = read<uint64_t>();
    need(len);
    std::string s(reinterpret_cast<const char*>(base_ + pos_), size_t(len));
    pos_ += len;
    return s;
  }

  std::string where;
  int64_t elem = -1;

 private:
  const std::string& path_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Reads one scalar of type t into v (v.type already set by the caller).
void read_scalar(Cursor& c, GgufValueType t, GgufValue& v, const std::string& path, const std::string& key) {
  switch (t) {
    case GgufValueType::U8: v.u = c.read<uint8_t>(); v.i = int64_t(v.u); break;
    case GgufValueType::U16: v.u = c.read<uint16_t>(); v.i = int64_t(v.u); break;
    case GgufValueType::U32: v.u = c.read<uint32_t>(); v.i = int64_t(v.u); break;
    case GgufValueType::U64:
      v.u = c.read<uint64_t>();
      v.i = v.u <= uint64_t(INT64_MAX) ? int64_t(v.u) : 0;  // out-of-range values live only in u
      break;
    case GgufValueType::I8: v.i = c.read<int8_t>(); v.u = uint64_t(v.i); break;
    case GgufValueType::I16: v.i = c.read<int16_t>(); v.u = uint64_t(v.i); break;
    case GgufValueType::I32: v.i = c.read<int32_t>(); v.u = uint64_t(v.i); break;
    case GgufValueType::I64: v.i = c.read<int64_t>(); v.u = uint64_t(v.i); break;
    case GgufValueType::F32: v.f = c.read<float>(); break;
    case GgufValueType::F64: v.f = c.read<double>(); break;
    case GgufValueType::BOOL: {
      uint64_t at = c.pos();
      uint8_t b = c.read<uint8_t>();
      if (b > 1)
        fail(TP_ERR_FORMAT, "%s: key '%s' has BOOL value %u at offset %llu, expected 0 or 1", path.c_str(),
             key.c_str(), unsigned(b), ull(at));
      v.i = b;
      v.u = b;
      break;
    }
    case GgufValueType::STRING: v.s = c.read_string(); break;
    case GgufValueType::ARRAY: break;  // handled by read_array
  }
}

// Element loop for one fixed-size type: reads n little-endian T's straight into out.
template <typename T, typename Out>
void read_elems(Cursor& c, uint64_t n, std::vector<Out>& out) {
  out.reserve(size_t(n));
  for (uint64_t k = 0; k < n; ++k) out.push_back(Out(c.read<T>()));
}

void read_array(Cursor& c, GgufValue& v, const std::string& path, const std::string& key) {
  uint64_t type_at = c.pos();
  uint32_t et = c.read<uint32_t>();
  if (et >= kTypeCount)
    fail(TP_ERR_FORMAT, "%s: key '%s' is an array of unknown value type %u at offset %llu (expected 0..12)",
         path.c_str(), key.c_str(), et, ull(type_at));
  if (GgufValueType(et) == GgufValueType::ARRAY)
    fail(TP_ERR_FORMAT, "%s: key '%s' is a nested array (element type ARRAY at offset %llu), not supported",
         path.c_str(), key.c_str(), ull(type_at));
  v.elem_type = GgufValueType(et);
  uint64_t count_at = c.pos();
  uint64_t n = c.read<uint64_t>();
  uint64_t min_bytes = min_value_bytes(v.elem_type);
  if (n > c.remaining() / min_bytes)
    fail(TP_ERR_FORMAT,
         "%s: truncated file: key '%s' declares %llu %s array elements at offset %llu (at least %llu bytes "
         "each) but the file has %llu bytes",
         path.c_str(), key.c_str(), ull(n), value_type_name(et), ull(count_at), ull(min_bytes),
         ull(c.pos() + c.remaining()));
  c.where = fmt("key '%s' array", key.c_str());
  switch (v.elem_type) {
    case GgufValueType::U8: read_elems<uint8_t>(c, n, v.ai); break;
    case GgufValueType::I8: read_elems<int8_t>(c, n, v.ai); break;
    case GgufValueType::U16: read_elems<uint16_t>(c, n, v.ai); break;
    case GgufValueType::I16: read_elems<int16_t>(c, n, v.ai); break;
    case GgufValueType::U32: read_elems<uint32_t>(c, n, v.ai); break;
    case GgufValueType::I32: read_elems<int32_t>(c, n, v.ai); break;
    case GgufValueType::U64: read_elems<uint64_t>(c, n, v.ai); break;  // bit pattern kept; see describe
    case GgufValueType::I64: read_elems<int64_t>(c, n, v.ai); break;
    case GgufValueType::F32: read_elems<float>(c, n, v.af); break;
    case GgufValueType::F64: read_elems<double>(c, n, v.af); break;
    case GgufValueType::BOOL:
      v.ai.reserve(size_t(n));
      for (uint64_t k = 0; k < n; ++k) {
        uint64_t at = c.pos();
        c.elem = int64_t(k);
        uint8_t b = c.read<uint8_t>();
        if (b > 1)
          fail(TP_ERR_FORMAT,
               "%s: key '%s' array element %llu has BOOL value %u at offset %llu, expected 0 or 1",
               path.c_str(), key.c_str(), ull(k), unsigned(b), ull(at));
        v.ai.push_back(b);
      }
      break;
    case GgufValueType::STRING:
      v.as.reserve(size_t(n));
      for (uint64_t k = 0; k < n; ++k) {
        c.elem = int64_t(k);
        v.as.push_back(c.read_string());
      }
      break;
    case GgufValueType::ARRAY: break;  // rejected above
  }
  c.elem = -1;
}

bool is_pow2(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// Printable form of a name read from the file for messages: clipped so a hostile megabyte name does not
// become a megabyte error message.
std::string clip(const std::string& s) { return s.size() <= 80 ? s : s.substr(0, 80) + "..."; }

}  // namespace

// ---- GgufValue ------------------------------------------------------------------------------------------

bool GgufValue::is_int() const {
  switch (type) {
    case GgufValueType::U8: case GgufValueType::I8: case GgufValueType::U16: case GgufValueType::I16:
    case GgufValueType::U32: case GgufValueType::I32: case GgufValueType::U64: case GgufValueType::I64:
      return true;
    default:
      return false;
  }
}

bool GgufValue::is_float() const { return type == GgufValueType::F32 || type == GgufValueType::F64; }

int64_t GgufValue::array_size() const {
  if (!is_array()) return 0;
  if (elem_type == GgufValueType::STRING) return int64_t(as.size());
  if (elem_type == GgufValueType::F32 || elem_type == GgufValueType::F64) return int64_t(af.size());
  return int64_t(ai.size());
}

// ---- GgufFile -------------------------------------------------------------------------------------------

GgufFile::GgufFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail(TP_ERR_IO, "%s: cannot open: %s", path.c_str(), std::strerror(errno));
  try {
    struct stat st;
    if (::fstat(fd_, &st) != 0) fail(TP_ERR_IO, "%s: cannot stat: %s", path.c_str(), std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail(TP_ERR_IO, "%s: not a regular file", path.c_str());
    size_ = uint64_t(st.st_size);
    if (size_ > 0) {  // mmap of length 0 is an error; an empty file is reported as truncated below
      void* p = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_PRIVATE, fd_, 0);
      if (p == MAP_FAILED) fail(TP_ERR_IO, "%s: cannot mmap %llu bytes: %s", path.c_str(), ull(size_),
                                std::strerror(errno));
      map_ = static_cast<const uint8_t*>(p);
      guard_slot_ = map_guard_add(p, size_t(size_), &read_fault_);
    }
    parse();
  } catch (...) {
    release();  // the destructor does not run for a constructor that throws
    throw;
  }
}

GgufFile::~GgufFile() { release(); }

void GgufFile::check_intact() const {
  check_reads();
  struct stat st;
  if (fd_ < 0 || ::fstat(fd_, &st) != 0)
    fail(TP_ERR_IO, "%s: cannot stat the open model file: %s", path_.c_str(), std::strerror(errno));
  // A file replaced by rename keeps our inode and stays safe; only an in-place truncation shrinks it.
  if (uint64_t(st.st_size) < size_)
    fail(TP_ERR_IO, "%s: the model file shrank from %llu to %llu bytes since it was loaded (truncated or being "
         "rewritten); restore it and create a new Engine", path_.c_str(), ull(size_), ull(st.st_size));
  truncate_fault_point(path_);
}

void GgufFile::check_reads() const {
  const uint64_t f = read_fault_.load(std::memory_order_acquire);
  if (f != 0)
    fail(TP_ERR_IO, "%s was truncated or replaced while in use (a read at byte %llu of the %llu it had when "
         "loaded found no data); the results of this call are discarded; reload the model", path_.c_str(),
         ull(f - 1), ull(size_));
}

void GgufFile::release() {
  map_guard_remove(guard_slot_);
  guard_slot_ = -1;
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_t(size_));
  map_ = nullptr;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void GgufFile::parse() {
  const char* P = path_.c_str();
  Cursor c(path_, map_, size_);

  // ---- header ----
  c.where = "header magic";
  c.need(4);
  if (std::memcmp(map_, "GGUF", 4) != 0)
    fail(TP_ERR_FORMAT,
         "%s: not a GGUF file: magic at offset 0 is %02x %02x %02x %02x, expected 47 47 55 46 (\"GGUF\")", P,
         map_[0], map_[1], map_[2], map_[3]);
  c.read<uint32_t>();
  c.where = "header version";
  version_ = c.read<uint32_t>();
  // A big-endian file's version 3 reads as 0x03000000 here: the low half is zero (the llama.cpp heuristic).
  if (version_ != 0 && (version_ & 0xFFFF) == 0)
    fail(TP_ERR_UNSUPPORTED, "%s: big-endian GGUF not supported (version field at offset 4 reads 0x%08x)", P,
         version_);
  if (version_ == 0) fail(TP_ERR_FORMAT, "%s: invalid GGUF version 0 at offset 4 (expected 2 or 3)", P);
  if (version_ == 1 || version_ > 3)
    fail(TP_ERR_UNSUPPORTED, "%s: unsupported GGUF version %u at offset 4 (this reader supports 2 and 3)", P,
         version_);
  c.where = "header n_tensors";
  uint64_t n_tensors = c.read<uint64_t>();
  c.where = "header n_kv";
  uint64_t n_kv = c.read<uint64_t>();
  if (n_kv > c.remaining() / kMinKvBytes)
    fail(TP_ERR_FORMAT,
         "%s: truncated file: header declares n_kv = %llu key-value pairs (at least %llu bytes each) after "
         "offset %llu but the file has %llu bytes",
         P, ull(n_kv), ull(kMinKvBytes), ull(c.pos()), ull(size_));

  // ---- metadata ----
  kv_.reserve(size_t(n_kv));
  for (uint64_t k = 0; k < n_kv; ++k) {
    c.where = fmt("key-value pair %llu key", ull(k));
    uint64_t key_at = c.pos();
    std::string key = c.read_string();
    if (key.empty()) fail(TP_ERR_FORMAT, "%s: key-value pair %llu has an empty key at offset %llu", P, ull(k),
                          ull(key_at));
    if (kv_index_.count(key))
      fail(TP_ERR_FORMAT, "%s: duplicate key '%s' (key-value pair %llu at offset %llu)", P, clip(key).c_str(),
           ull(k), ull(key_at));
    c.where = fmt("key '%s' value type", clip(key).c_str());
    uint64_t type_at = c.pos();
    uint32_t t = c.read<uint32_t>();
    if (t >= kTypeCount)
      fail(TP_ERR_FORMAT, "%s: key '%s' has unknown value type %u at offset %llu (expected 0..12)", P,
           clip(key).c_str(), t, ull(type_at));
    GgufValue v;
    v.type = GgufValueType(t);
    c.where = fmt("key '%s' value", clip(key).c_str());
    if (v.type == GgufValueType::ARRAY)
      read_array(c, v, path_, clip(key));
    else
      read_scalar(c, v.type, v, path_, clip(key));

    if (key == "general.alignment") {
      if (v.type != GgufValueType::U32)
        fail(TP_ERR_FORMAT, "%s: key 'general.alignment' has type %s, expected U32", P, value_type_name(t));
      if (!is_pow2(v.u))
        fail(TP_ERR_FORMAT, "%s: key 'general.alignment' is %llu, expected a non-zero power of two", P,
             ull(v.u));
      alignment_ = v.u;
    }
    kv_index_.emplace(key, kv_.size());
    kv_.emplace_back(std::move(key), std::move(v));
  }

  // ---- tensor infos ----
  if (n_tensors > c.remaining() / kMinTensorInfoBytes)
    fail(TP_ERR_FORMAT,
         "%s: truncated file: header declares n_tensors = %llu (at least %llu bytes of tensor info each) "
         "after offset %llu but the file has %llu bytes",
         P, ull(n_tensors), ull(kMinTensorInfoBytes), ull(c.pos()), ull(size_));
  tensors_.reserve(size_t(n_tensors));
  for (uint64_t ti = 0; ti < n_tensors; ++ti) {
    GgufTensor t;
    c.where = fmt("tensor info %llu name", ull(ti));
    uint64_t name_at = c.pos();
    t.name = c.read_string();
    if (t.name.size() >= kMaxTensorName)
      fail(TP_ERR_FORMAT, "%s: tensor info %llu ('%s') at offset %llu: name is %llu bytes, the limit is %llu",
           P, ull(ti), clip(t.name).c_str(), ull(name_at), ull(t.name.size()), ull(kMaxTensorName - 1));
    const char* N = t.name.c_str();
    if (tensor_index_.count(t.name))
      fail(TP_ERR_FORMAT, "%s: duplicate tensor name '%s' (tensor info %llu at offset %llu)", P, N, ull(ti),
           ull(name_at));
    c.where = fmt("tensor info %llu ('%s')", ull(ti), N);
    uint64_t dims_at = c.pos();
    uint32_t n_dims = c.read<uint32_t>();
    if (n_dims < 1 || n_dims > 4)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' has n_dims = %u at offset %llu, expected 1..4", P, N, n_dims,
           ull(dims_at));
    t.n_dims = int(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne_at = c.pos();
      uint64_t ne = c.read<uint64_t>();
      if (ne > uint64_t(INT64_MAX))
        fail(TP_ERR_FORMAT, "%s: tensor '%s' has ne[%u] = %lld at offset %llu, expected >= 0", P, N, d,
             (long long)int64_t(ne), ull(ne_at));
      t.ne[d] = int64_t(ne);
    }
    uint64_t type_at = c.pos();
    uint32_t type = c.read<uint32_t>();
    t.offset = c.read<uint64_t>();

    // Element count must fit int64: multiply with an overflow check (every ne is >= 0 here).
    int64_t n_el = 1;
    for (int d = 0; d < 4; ++d) {
      if (__builtin_mul_overflow(n_el, t.ne[d], &n_el))
        fail(TP_ERR_FORMAT,
             "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld]: element count overflows int64", P, N,
             (long long)t.ne[0], (long long)t.ne[1], (long long)t.ne[2], (long long)t.ne[3]);
    }
    TypeTraits tr = type_traits(type > uint32_t(INT32_MAX) ? -1 : int32_t(type));
    if (tr.block_elems <= 0)
      fail(TP_ERR_UNSUPPORTED, "%s: unsupported tensor type id %u in tensor '%s' (at offset %llu)", P, type,
           N, ull(type_at));
    t.type = int32_t(type);
    if (t.ne[0] % tr.block_elems != 0)
      fail(TP_ERR_FORMAT,
           "%s: tensor '%s' has type %s with ne[0] = %lld, which is not a multiple of the block size %lld", P,
           N, tr.name, (long long)t.ne[0], (long long)tr.block_elems);
    // nbytes = blocks per row * block bytes * rows; checked in u64 (the range check below bounds it anyway).
    uint64_t nbytes = 0;
    bool ovf = __builtin_mul_overflow(uint64_t(t.ne[0] / tr.block_elems), uint64_t(tr.block_bytes), &nbytes);
    for (int d = 1; d < 4 && !ovf; ++d) ovf = __builtin_mul_overflow(nbytes, uint64_t(t.ne[d]), &nbytes);
    if (ovf)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' byte size overflows 64 bits (shape [%lld, %lld, %lld, %lld] %s)",
           P, N, (long long)t.ne[0], (long long)t.ne[1], (long long)t.ne[2], (long long)t.ne[3], tr.name);
    t.nbytes = nbytes;
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // ---- data section ----
  uint64_t end_infos = c.pos();
  data_offset_ = end_infos + (alignment_ - end_infos % alignment_) % alignment_;
  if (!tensors_.empty() && data_offset_ > size_)
    fail(TP_ERR_FORMAT,
         "%s: truncated file: data section starts at offset %llu (tensor infos end at %llu, alignment %llu) "
         "but the file has %llu bytes",
         P, ull(data_offset_), ull(end_infos), ull(alignment_), ull(size_));
  const uint64_t data_bytes = tensors_.empty() ? 0 : size_ - data_offset_;
  for (GgufTensor& t : tensors_) {
    if (t.offset % alignment_ != 0)
      fail(TP_ERR_FORMAT, "%s: tensor '%s' offset %llu is not a multiple of the alignment %llu", P,
           t.name.c_str(), ull(t.offset), ull(alignment_));
    if (t.offset > data_bytes || t.nbytes > data_bytes - t.offset)
      fail(TP_ERR_FORMAT,
           "%s: truncated file: tensor '%s' data needs %llu bytes at offset %llu (data section %llu + %llu) "
           "but the file has %llu bytes",
           P, t.name.c_str(), ull(t.nbytes), ull(data_offset_ + t.offset), ull(data_offset_), ull(t.offset),
           ull(size_));
    t.data = map_ + data_offset_ + t.offset;
  }

  // Ranges must not overlap: sort by start and compare neighbours. Empty tensors occupy no bytes.
  std::vector<const GgufTensor*> order;
  order.reserve(tensors_.size());
  for (const GgufTensor& t : tensors_)
    if (t.nbytes > 0) order.push_back(&t);
  std::sort(order.begin(), order.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const GgufTensor* a = order[k - 1];
    const GgufTensor* b = order[k];
    if (a->offset + a->nbytes > b->offset)
      fail(TP_ERR_FORMAT,
           "%s: tensors '%s' (data offset %llu, %llu bytes) and '%s' (data offset %llu, %llu bytes) overlap",
           P, a->name.c_str(), ull(a->offset), ull(a->nbytes), b->name.c_str(), ull(b->offset),
           ull(b->nbytes));
  }
}

// ---- lookups and typed getters --------------------------------------------------------------------------

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) fail(TP_ERR_FORMAT, "%s: missing required key '%s'", path_.c_str(), key.c_str());
  if (v->type != GgufValueType::STRING)
    fail(TP_ERR_FORMAT, "%s: key '%s' has type %s, expected STRING", path_.c_str(), key.c_str(),
         value_type_name(uint32_t(v->type)));
  return v->s;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) fail(TP_ERR_FORMAT, "%s: missing required key '%s'", path_.c_str(), key.c_str());
  if (!v->is_int())
    fail(TP_ERR_FORMAT, "%s: key '%s' has type %s, expected an integer", path_.c_str(), key.c_str(),
         value_type_name(uint32_t(v->type)));
  if (v->type == GgufValueType::U64 && v->u > uint64_t(INT64_MAX))
    fail(TP_ERR_FORMAT, "%s: key '%s' is %llu, which does not fit in int64", path_.c_str(), key.c_str(),
         ull(v->u));
  return v->i;
}

int64_t GgufFile::get_int_or(const std::string& key, int64_t def) const {
  return find(key) ? get_int(key) : def;
}

double GgufFile::get_float_or(const std::string& key, double def) const {
  const GgufValue* v = find(key);
  if (!v) return def;
  if (v->is_float()) return v->f;
  if (v->is_int()) return v->type == GgufValueType::U64 ? double(v->u) : double(v->i);
  fail(TP_ERR_FORMAT, "%s: key '%s' has type %s, expected a number", path_.c_str(), key.c_str(),
       value_type_name(uint32_t(v->type)));
}

}  // namespace tp
