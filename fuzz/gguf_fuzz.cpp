// gguf_fuzz.cpp — libFuzzer target: one input = one GGUF file, through every path tp_engine_create takes
// before the first matmul.
//
// Per input, through the C ABI (exactly what Python calls):
//   1. tp_gguf_describe_json: GgufFile (header, metadata, tensor table) + the JSON that describe_gguf and the
//      tokenizer read;
//   2. tp_engine_create with one CPU stage, or two when the file has enough layers: GgufFile, load_config,
//      load_weights, stage placement (layer split, weight views, scratch buffers sized from the file's
//      dimensions), then tp_engine_info;
//   3. tp_vision_create on the CPU (the mmproj loader: clip keys, vision weights, the encoder's Ops), then
//      tp_vision_info_get — every file goes through both loaders, as a user may pass either path.
// A hostile file must end in a status the user can act on: FORMAT, UNSUPPORTED, IO or OUT_OF_MEMORY (the
// latter for dimensions that are consistent but too large for this machine). INTERNAL means an exception
// escaped as a bug, so it aborts like a sanitizer report would; so does any other status.
//
// GgufFile takes a path and mmaps it, so the input is written to a memfd and opened as /proc/self/fd/N:
// the reader's code path is the real one (open, fstat, mmap) without touching the disk.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "include/turboprefill.h"

namespace {

int input_fd() {
  static const int fd = memfd_create("tp-gguf-fuzz", 0);
  if (fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  return fd;
}

void write_input(int fd, const uint8_t* data, size_t size) {
  if (ftruncate(fd, 0) != 0 || ftruncate(fd, off_t(size)) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = pwrite(fd, data + done, size - done, off_t(done));
    if (n <= 0) std::abort();
    done += size_t(n);
  }
}

void expect_clean(tp_status st, const char* call) {
  switch (st) {
    case TP_OK: case TP_ERR_IO: case TP_ERR_FORMAT: case TP_ERR_UNSUPPORTED: case TP_ERR_OUT_OF_MEMORY:
      return;
    default:
      std::fprintf(stderr, "%s returned status %d for a hostile file: %s\n", call, int(st), tp_last_error());
      std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = input_fd();
  write_input(fd, data, size);
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  char* json = nullptr;
  expect_clean(tp_gguf_describe_json(path.c_str(), &json), "tp_gguf_describe_json");
  if (json == nullptr) return 0;  // the reader refused the file: the engine would too
  tp_free(json);

  tp_engine_params p;
  tp_engine_params_default(&p);
  p.model_path = path.c_str();
  p.threads = 1;
  p.ubatch = 4;
  p.devices = "cpu";
  tp_vision* vis = nullptr;
  if (tp_vision_create(path.c_str(), "cpu", 1, &vis) == TP_OK) {
    tp_vision_info vinfo;
    expect_clean(tp_vision_info_get(vis, &vinfo), "tp_vision_info_get");
    tp_vision_free(vis);
  } else {
    expect_clean(tp_vision_create(path.c_str(), "cpu", 1, &vis), "tp_vision_create");
  }

  tp_engine* eng = nullptr;
  tp_status st = tp_engine_create(&p, &eng);
  expect_clean(st, "tp_engine_create(cpu)");
  if (st != TP_OK) return 0;
  tp_model_info info;
  expect_clean(tp_engine_info(eng, &info), "tp_engine_info");
  tp_engine_free(eng);
  if (info.n_layer >= 2) {  // the layer split and the inter-stage ring, as `devices="cpu:0,cpu:1"` does
    p.devices = "cpu:0,cpu:1";
    eng = nullptr;
    expect_clean(tp_engine_create(&p, &eng), "tp_engine_create(cpu:0,cpu:1)");
    tp_engine_free(eng);
  }
  return 0;
}
