// state.cpp — Engine::save_state / load_state: slot 0's KV cache as a file (a prefix cache).
//
// A state is only meaningful for the exact model and placement that wrote it: the cache is per stage and
// per stage-local layer, and its values depend on every weight. So the file opens with an identity
// header, checked field by field on load with a message naming what differs:
//
//   magic "TPKVSTAT" | u32 version | u32 header_bytes
//   u64 model file size | u64 FNV-1a of the GGUF's bytes [0, data_offset) (header, metadata, tensor table)
//   i64 n_layer | i64 kv_dim | i64 n_stages | i64 layers per stage [n_stages] | i64 n_past
//   i64 next_pos (version 2: the rope position of the next plain token, which M-RoPE positions move ahead of
//   n_past; a version 1 state, written before M-RoPE models were supported, is read with next_pos = n_past)
//   char kv_type[8] ("f32": cpu stages keep f32; "f16": cuda stages keep f16)
//   payload: for each stage, each stage-local layer: K then V, [n_past, kv_dim] f32 little-endian
//   u64 FNV-1a of the payload (catches a corrupt file; truncation is caught by the size first)
//
// Weights are not hashed (that would read the whole model on every save); a model rewritten in place with
// the same header and size but other weights is not detected. Values are stored as f32 whatever the
// backend keeps, so a cuda state holds its f16 values exactly; loading one backend's state into the other
// is refused because f32 -> f16 would round and break "the next tokens' logits are bit-identical".
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common.h"
#include "engine.h"

namespace tp {

namespace {

constexpr char kMagic[8] = {'T', 'P', 'K', 'V', 'S', 'T', 'A', 'T'};
constexpr uint32_t kVersion = 2;

struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
};

// FNV-1a of the GGUF's header, metadata and tensor table: identifies the model without reading weights.
uint64_t model_header_hash(const GgufFile& f) {
  FILE* fp = std::fopen(f.path().c_str(), "rb");
  if (!fp) fail(TP_ERR_IO, "cannot reopen the model %s to identify it: %s", f.path().c_str(), std::strerror(errno));
  Fnv h;
  std::vector<uint8_t> buf(1 << 20);
  uint64_t left = f.data_offset();
  while (left > 0) {
    const size_t n = std::fread(buf.data(), 1, size_t(std::min<uint64_t>(left, buf.size())), fp);
    if (n == 0) break;
    h.add(buf.data(), n);
    left -= n;
  }
  std::fclose(fp);
  if (left) fail(TP_ERR_IO, "cannot read the header of the model %s to identify it", f.path().c_str());
  return h.h;
}

struct Header {
  uint64_t file_size = 0, model_hash = 0;
  int64_t n_layer = 0, kv_dim = 0, n_past = 0, next_pos = 0;
  std::vector<int64_t> split;
  char kv_type[8] = {};
};

const char* stage_kv_type(const Stage& st) { return st.device.rfind("cuda", 0) == 0 ? "f16" : "f32"; }

std::string split_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

class File {
 public:
  File(const std::string& path, const char* mode, const char* what) : path_(path) {
    fp_ = std::fopen(path.c_str(), mode);
    if (!fp_) fail(TP_ERR_IO, "cannot open %s to %s: %s", path.c_str(), what, std::strerror(errno));
  }
  ~File() {
    if (fp_) std::fclose(fp_);
  }
  void write(const void* p, size_t n, Fnv* h = nullptr) {
    if (n == 0) return;  // an empty sequence's KV data: its buffer may be null (fwrite's argument must not be)
    if (std::fwrite(p, 1, n, fp_) != n)
      fail(TP_ERR_IO, "writing the state %s failed: %s (disk full?)", path_.c_str(), std::strerror(errno));
    if (h) h->add(p, n);
  }
  void read(void* p, size_t n, Fnv* h = nullptr) {
    if (n == 0) return;
    if (std::fread(p, 1, n, fp_) != n)
      fail(TP_ERR_FORMAT, "the state %s is truncated (ends inside %s); save it again", path_.c_str(),
           h ? "the KV data" : "the header");
    if (h) h->add(p, n);
  }
  template <typename T>
  void put(T v) {
    write(&v, sizeof v);
  }
  template <typename T>
  T get() {
    T v;
    read(&v, sizeof v);
    return v;
  }
  void close() {
    const int rc = std::fclose(fp_);
    fp_ = nullptr;
    if (rc != 0) fail(TP_ERR_IO, "closing the state %s failed: %s", path_.c_str(), std::strerror(errno));
  }
  FILE* fp() { return fp_; }

 private:
  std::string path_;
  FILE* fp_ = nullptr;
};

}  // namespace

void Engine::save_state(const std::string& path) {
  // Exclusive: the caches are read from this thread, so no stage may be working meanwhile.
  std::unique_lock<std::shared_mutex> state(state_mu_);
  const Slot cur = slot(0);
  const int64_t kv_dim = cfg_.kv_dim(), n = cur.n_past;
  // Written to a temporary name and renamed, so a failed save never leaves a half state under `path`.
  const std::string tmp = path + ".tmp";
  {
    File f(tmp, "wb", "save the state");
    f.write(kMagic, sizeof kMagic);
    f.put<uint32_t>(kVersion);
    f.put<uint32_t>(uint32_t(sizeof(kMagic) + 8 + 16 + 24 + 8 * stages_.size() + 8 + 8 + 8));
    f.put<uint64_t>(file_->file_size());
    f.put<uint64_t>(model_header_hash(*file_));
    f.put<int64_t>(cfg_.n_layer);
    f.put<int64_t>(kv_dim);
    f.put<int64_t>(int64_t(stages_.size()));
    for (const auto& st : stages_) f.put<int64_t>(st->n_layers());
    f.put<int64_t>(n);
    f.put<int64_t>(cur.next_pos);
    char kt[8] = {};
    std::strncpy(kt, stage_kv_type(*stages_[0]), sizeof kt - 1);
    f.write(kt, sizeof kt);
    Fnv h;
    std::vector<float> k(size_t(n * kv_dim)), v(k.size());
    for (const auto& st : stages_)
      for (int64_t l = 0; l < st->n_layers(); ++l) {
        if (n > 0) st->ops->kv_to_host(0, int(l), k.data(), v.data(), n);
        f.write(k.data(), k.size() * sizeof(float), &h);
        f.write(v.data(), v.size() * sizeof(float), &h);
      }
    f.put<uint64_t>(h.h);
    f.close();
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail(TP_ERR_IO, "cannot move the state to %s: %s", path.c_str(), std::strerror(errno));
  }
}

void Engine::load_state(const std::string& path) {
  std::unique_lock<std::shared_mutex> state(state_mu_);  // exclusive, as save_state
  File f(path, "rb", "load the state");
  char magic[8];
  f.read(magic, sizeof magic);
  if (std::memcmp(magic, kMagic, sizeof magic) != 0)
    fail(TP_ERR_FORMAT, "%s is not a turboprefill state (bad magic); states are written by Engine.save_state()",
         path.c_str());
  const uint32_t version = f.get<uint32_t>();
  if (version != 1 && version != kVersion)
    fail(TP_ERR_UNSUPPORTED, "%s is a state of format version %u; this build reads versions 1 and %u (save it again)",
         path.c_str(), version, kVersion);
  f.get<uint32_t>();  // header size: lets a later version skip fields it adds
  Header hd;
  hd.file_size = f.get<uint64_t>();
  hd.model_hash = f.get<uint64_t>();
  hd.n_layer = f.get<int64_t>();
  hd.kv_dim = f.get<int64_t>();
  const int64_t n_stages = f.get<int64_t>();
  if (n_stages < 1 || n_stages > TP_MAX_STAGES) fail(TP_ERR_FORMAT, "%s: corrupt header (%lld stages)", path.c_str(),
                                                     (long long)n_stages);
  for (int64_t s = 0; s < n_stages; ++s) hd.split.push_back(f.get<int64_t>());
  hd.n_past = f.get<int64_t>();
  hd.next_pos = version >= 2 ? f.get<int64_t>() : hd.n_past;
  f.read(hd.kv_type, sizeof hd.kv_type);
  hd.kv_type[7] = '\0';

  const char* who = path.c_str();
  if (hd.file_size != file_->file_size() || hd.model_hash != model_header_hash(*file_))
    fail(TP_ERR_INVALID_ARGUMENT, "%s was saved from another model (file of %llu bytes, header hash %016llx) than %s "
         "(%llu bytes, %016llx); load it into an Engine of the model that saved it",
         who, (unsigned long long)hd.file_size, (unsigned long long)hd.model_hash, file_->path().c_str(),
         (unsigned long long)file_->file_size(), (unsigned long long)model_header_hash(*file_));
  if (hd.n_layer != cfg_.n_layer || hd.kv_dim != cfg_.kv_dim())
    fail(TP_ERR_FORMAT, "%s: corrupt header (n_layer %lld, kv_dim %lld; the model has %lld, %lld)", who,
         (long long)hd.n_layer, (long long)hd.kv_dim, (long long)cfg_.n_layer, (long long)cfg_.kv_dim());
  std::vector<int64_t> mine;
  for (const auto& st : stages_) mine.push_back(st->n_layers());
  if (hd.split != mine)
    fail(TP_ERR_INVALID_ARGUMENT, "%s was saved with layer_split=%s but this engine has %s; create the Engine with "
         "layer_split=%s (and as many devices)", who, split_str(hd.split).c_str(), split_str(mine).c_str(),
         split_str(hd.split).c_str());
  if (std::strcmp(hd.kv_type, stage_kv_type(*stages_[0])) != 0)
    fail(TP_ERR_INVALID_ARGUMENT, "%s holds a %s KV cache (saved on %s stages) but this engine keeps %s; load it on "
         "the same kind of device", who, hd.kv_type, std::strcmp(hd.kv_type, "f16") == 0 ? "cuda" : "cpu",
         stage_kv_type(*stages_[0]));
  if (hd.n_past < 0 || hd.n_past > n_ctx_)
    fail(TP_ERR_CONTEXT_OVERFLOW, "%s holds %lld tokens but this engine's context is %lld; create it with n_ctx >= "
         "%lld", who, (long long)hd.n_past, (long long)n_ctx_, (long long)hd.n_past);
  if (hd.next_pos < 0 || hd.next_pos > INT32_MAX || (!cfg_.mrope() && hd.next_pos != hd.n_past))
    fail(TP_ERR_FORMAT, "%s: corrupt header (next_pos %lld with %lld tokens)", who, (long long)hd.next_pos,
         (long long)hd.n_past);
  // Size check before reading: a truncated file fails here, without touching the current sequence.
  const uint64_t payload = uint64_t(cfg_.n_layer) * 2 * uint64_t(hd.n_past * hd.kv_dim) * sizeof(float);
  const long here = std::ftell(f.fp());
  std::fseek(f.fp(), 0, SEEK_END);
  const long end = std::ftell(f.fp());
  std::fseek(f.fp(), here, SEEK_SET);
  if (here < 0 || end < 0 || uint64_t(end - here) != payload + 8)
    fail(TP_ERR_FORMAT, "%s is %s: %lld bytes of KV data for %lld tokens, expected %llu; save it again", who,
         uint64_t(end - here) < payload + 8 ? "truncated" : "corrupt (trailing bytes)", (long long)(end - here - 8),
         (long long)hd.n_past, (unsigned long long)payload);

  // Read and verify everything before the cache changes, so a corrupt file leaves the sequence intact.
  const size_t per = size_t(hd.n_past * hd.kv_dim);
  std::vector<float> data(size_t(cfg_.n_layer) * 2 * per);
  Fnv h;
  f.read(data.data(), data.size() * sizeof(float), &h);
  if (f.get<uint64_t>() != h.h)
    fail(TP_ERR_FORMAT, "%s is corrupt (KV data checksum mismatch); save it again", who);

  auto set_slot0 = [&](int64_t n_past, int64_t next_pos) {
    std::lock_guard<std::mutex> lk(seq_mu_);
    seqs_[0].n_past = n_past;
    seqs_[0].next_pos = next_pos;
  };
  set_slot0(0, 0);  // until every stage holds the loaded cache
  size_t off = 0;
  for (auto& st : stages_) {
    st->ops->kv_reserve(0, st->n_layers(), cfg_.kv_dim(), std::max<int64_t>(hd.n_past, 1));
    for (int64_t l = 0; l < st->n_layers() && hd.n_past > 0; ++l, off += 2 * per)  // an empty state has no data
      st->ops->kv_from_host(0, int(l), data.data() + off, data.data() + off + per, hd.n_past);
  }
  set_slot0(hd.n_past, hd.next_pos);
}

}  // namespace tp
