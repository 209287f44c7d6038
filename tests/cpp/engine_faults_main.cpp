// engine_faults_main.cpp — engines and vision encoders through every failure the C ABI reports, for the
// sanitizer CI stages (.ci/run): under AddressSanitizer with LeakSanitizer on, any allocation an error path
// forgets fails the run at exit; under ThreadSanitizer, the two-stage pipelined prefills cancelled from
// another thread are the race check of the whole engine (the ring alone is tp_ring_stress).
//
//   tp_engine_faults MODEL.gguf MMPROJ.gguf [ROUNDS]
//
// MODEL: a small llama-like model with at least 2 layers and a vocabulary of at least 64 tokens; MMPROJ: a
// qwen2.5vl mmproj. Write both with the Python writers (turboprefill.writer / writer_vision, see .ci/run).
// Truncation scenarios work on copies next to the inputs, so the directory must be writable. ROUNDS
// (default 3) repeats the cancel race. Exits 1 at the first call that returns an unexpected status.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "include/turboprefill.h"

namespace {

int g_checks = 0;

// Exits unless `got` is one of the statuses allowed for this call.
void expect(const char* what, tp_status got, std::initializer_list<tp_status> allowed) {
  ++g_checks;
  for (tp_status s : allowed)
    if (got == s) return;
  std::fprintf(stderr, "FAILED: %s returned status %d: %s\n", what, int(got), tp_last_error());
  std::exit(1);
}

void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out << in.rdbuf();
  if (!in || !out) {
    std::fprintf(stderr, "FAILED: cannot copy %s to %s\n", from.c_str(), to.c_str());
    std::exit(1);
  }
}

int64_t file_size(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  return int64_t(f.tellg());
}

tp_engine* create(const std::string& model, const char* devices, int64_t n_ctx, tp_status want = TP_OK) {
  tp_engine_params p;
  tp_engine_params_default(&p);
  p.model_path = model.c_str();
  p.devices = devices;
  p.threads = 1;
  p.ubatch = 8;
  p.n_ctx = n_ctx;
  tp_engine* e = nullptr;
  expect("tp_engine_create", tp_engine_create(&p, &e), {want});
  return e;
}

tp_status prefill(tp_engine* e, const std::vector<int32_t>& toks, std::vector<float>* logits, bool all = false) {
  return tp_engine_prefill(e, toks.data(), int64_t(toks.size()), all ? 1 : 0, logits ? logits->data() : nullptr,
                           logits ? int64_t(logits->size()) : 0);
}

std::vector<int32_t> tokens(int64_t n, int64_t n_vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t((i * 7 + 3) % n_vocab);
  return t;
}

// Successful runs and argument errors on one and two stages, both schedules.
void plain_and_bad_arguments(const std::string& model, int64_t n_vocab, int64_t n_layer) {
  for (const char* devices : {"cpu", "cpu:0,cpu:1"}) {
    tp_engine* e = create(model, devices, 64);
    std::vector<float> logits(size_t(20 * n_vocab));
    expect("prefill", prefill(e, tokens(20, n_vocab), &logits, true), {TP_OK});
    std::vector<int32_t> bad = tokens(5, n_vocab);
    bad[2] = int32_t(n_vocab);
    expect("prefill with a token past the vocabulary", prefill(e, bad, nullptr), {TP_ERR_INVALID_ARGUMENT});
    bad[2] = -1;
    expect("prefill with a negative token", prefill(e, bad, nullptr), {TP_ERR_INVALID_ARGUMENT});
    expect("prefill past n_ctx", prefill(e, tokens(50, n_vocab), nullptr), {TP_ERR_CONTEXT_OVERFLOW});
    std::vector<float> small(3);
    expect("prefill into a short logits buffer", prefill(e, tokens(4, n_vocab), &small), {TP_ERR_INVALID_ARGUMENT});
    expect("reset", tp_engine_reset(e), {TP_OK});
    tp_engine_free(e);
  }
  std::string too_many = "cpu:0";  // one stage more than there are layers: refused once the model is loaded
  for (int64_t s = 1; s <= n_layer; ++s) too_many += ",cpu:" + std::to_string(s);
  create(model, too_many.c_str(), 0, TP_ERR_INVALID_ARGUMENT);
  create(model + ".missing", "cpu", 0, TP_ERR_IO);
}

// A stage that fails part-way stops both stages; the engine then runs again.
void injected_stage_fault(const std::string& model, int64_t n_vocab) {
  tp_engine* e = create(model, "cpu:0,cpu:1", 64);
  expect("inject_fault", tp_engine_inject_fault(e, 1), {TP_OK});
  expect("prefill with a failing layer", prefill(e, tokens(30, n_vocab), nullptr), {TP_ERR_INTERNAL});
  expect("inject_fault off", tp_engine_inject_fault(e, -1), {TP_OK});
  expect("prefill after the fault", prefill(e, tokens(30, n_vocab), nullptr), {TP_OK});
  tp_engine_free(e);
}

// tp_engine_cancel from another thread while two pipelined stages run, the first cancel at a later point of
// the run each round (from its start to past its end): every prefill ends OK (no cancel landed during the
// run) or CANCELLED, and the engine keeps working.
void cancel_race(const std::string& model, int64_t n_vocab, int rounds) {
  tp_engine* e = create(model, "cpu:0,cpu:1", 512);
  const auto t0 = std::chrono::steady_clock::now();
  expect("prefill", prefill(e, tokens(200, n_vocab), nullptr), {TP_OK});
  const auto run = std::chrono::steady_clock::now() - t0;
  tp_engine_reset(e);
  int cancelled = 0;
  for (int r = 0; r < rounds; ++r) {
    std::atomic<bool> done{false};
    std::thread canceller([&] {
      std::this_thread::sleep_for(run * (r + 1) / rounds);
      while (!done.load()) {
        tp_engine_cancel(e);
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    });
    std::vector<float> logits(static_cast<size_t>(n_vocab));
    const tp_status s = prefill(e, tokens(200, n_vocab), &logits);
    done.store(true);
    canceller.join();
    expect("prefill cancelled from another thread", s, {TP_OK, TP_ERR_CANCELLED});
    cancelled += s == TP_ERR_CANCELLED;
    tp_engine_reset(e);
  }
  expect("prefill after the cancels", prefill(e, tokens(40, n_vocab), nullptr), {TP_OK});
  tp_engine_free(e);
  std::printf("cancel race: %d of %d prefills cancelled\n", cancelled, rounds);
}

void failed_allocations(const std::string& model, int64_t n_vocab) {
  // Each activation buffer of a two-stage engine failing in turn, until creation gets through.
  int failed = 0;
  for (int n = 1; n < 200; ++n) {
    expect("tp_test_fail_alloc", tp_test_fail_alloc(TP_ALLOC_ACTIVATION, n), {TP_OK});
    tp_engine_params p;
    tp_engine_params_default(&p);
    p.model_path = model.c_str();
    p.devices = "cpu:0,cpu:1";
    p.threads = 1;
    p.ubatch = 8;
    tp_engine* e = nullptr;
    const tp_status s = tp_engine_create(&p, &e);
    expect("create with a failing activation buffer", s, {TP_OK, TP_ERR_OUT_OF_MEMORY});
    if (s == TP_OK) {
      tp_engine_free(e);
      break;
    }
    ++failed;
  }
  expect("disarm", tp_test_fail_alloc(TP_ALLOC_ACTIVATION, 0), {TP_OK});
  // KV cache growth part-way through the layers, and the all-token logits inside the pipeline.
  tp_engine* e = create(model, "cpu:0,cpu:1", 512);
  expect("prefill", prefill(e, tokens(10, n_vocab), nullptr), {TP_OK});
  expect("tp_test_fail_alloc", tp_test_fail_alloc(TP_ALLOC_KV_CACHE, 2), {TP_OK});
  expect("prefill with a failing KV growth", prefill(e, tokens(300, n_vocab), nullptr), {TP_ERR_OUT_OF_MEMORY});
  expect("tp_test_fail_alloc", tp_test_fail_alloc(TP_ALLOC_ACTIVATION, 1), {TP_OK});
  std::vector<float> logits(size_t(20 * n_vocab));
  expect("prefill with failing logits", prefill(e, tokens(20, n_vocab), &logits, true), {TP_ERR_OUT_OF_MEMORY});
  expect("prefill after the failures", prefill(e, tokens(20, n_vocab), &logits, true), {TP_OK});
  tp_engine_free(e);
  std::printf("failed allocations: %d at creation, KV growth, logits\n", failed);
}

// The model file cut during a run: TP_ERR_IO, then the engine refuses to run and frees cleanly.
void truncated_model(const std::string& model, int64_t n_vocab) {
  const std::string copy = model + ".truncated";
  copy_file(model, copy);
  tp_engine* e = create(copy, "cpu:0,cpu:1", 64);
  expect("arm truncation", tp_test_truncate_after_check(copy.c_str(), file_size(copy) / 2), {TP_OK});
  expect("prefill over a truncated file", prefill(e, tokens(30, n_vocab), nullptr), {TP_ERR_IO});
  expect("prefill after the truncation", prefill(e, tokens(30, n_vocab), nullptr), {TP_ERR_IO});
  tp_engine_free(e);
  std::remove(copy.c_str());
}

void vision(const std::string& mmproj) {
  const std::string copy = mmproj + ".truncated";
  copy_file(mmproj, copy);
  tp_vision* v = nullptr;
  expect("tp_vision_create", tp_vision_create(copy.c_str(), "cpu", 1, &v), {TP_OK});
  tp_vision_info info;
  expect("tp_vision_info_get", tp_vision_info_get(v, &info), {TP_OK});
  const int64_t h = 56, w = 84;
  std::vector<float> px(size_t(3 * h * w), 0.25f), out(size_t((h / 28) * (w / 28) * info.proj_dim));
  expect("encode", tp_vision_encode(v, px.data(), h, w, out.data(), int64_t(out.size()), nullptr), {TP_OK});
  expect("encode of a bad size", tp_vision_encode(v, px.data(), h + 1, w, out.data(), int64_t(out.size()), nullptr),
         {TP_ERR_INVALID_ARGUMENT});
  // A larger image grows the encoder's buffers: the growth fails part-way, then succeeds.
  const int64_t h2 = 112, w2 = 112;
  std::vector<float> px2(size_t(3 * h2 * w2), 0.5f), out2(size_t((h2 / 28) * (w2 / 28) * info.proj_dim));
  expect("tp_test_fail_alloc", tp_test_fail_alloc(TP_ALLOC_ACTIVATION, 4), {TP_OK});
  expect("encode with a failing buffer", tp_vision_encode(v, px2.data(), h2, w2, out2.data(), int64_t(out2.size()),
                                                          nullptr), {TP_ERR_OUT_OF_MEMORY});
  expect("encode after the failure", tp_vision_encode(v, px2.data(), h2, w2, out2.data(), int64_t(out2.size()),
                                                      nullptr), {TP_OK});
  expect("arm truncation", tp_test_truncate_after_check(copy.c_str(), file_size(copy) / 2), {TP_OK});
  expect("encode over a truncated file", tp_vision_encode(v, px.data(), h, w, out.data(), int64_t(out.size()),
                                                          nullptr), {TP_ERR_IO});
  expect("encode after the truncation", tp_vision_encode(v, px.data(), h, w, out.data(), int64_t(out.size()),
                                                         nullptr), {TP_ERR_IO});
  tp_vision_free(v);
  tp_vision* bad = nullptr;
  expect("tp_vision_create on a truncated file", tp_vision_create(copy.c_str(), "cpu", 1, &bad), {TP_ERR_FORMAT});
  std::remove(copy.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.gguf MMPROJ.gguf [ROUNDS]\n", argv[0]);
    return 2;
  }
  const std::string model = argv[1], mmproj = argv[2];
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 3;
  tp_engine* e = create(model, "cpu", 0);
  tp_model_info info;
  expect("tp_engine_info", tp_engine_info(e, &info), {TP_OK});
  tp_engine_free(e);
  const int64_t n_vocab = info.n_vocab;

  plain_and_bad_arguments(model, n_vocab, info.n_layer);
  injected_stage_fault(model, n_vocab);
  cancel_race(model, n_vocab, rounds);
  failed_allocations(model, n_vocab);
  truncated_model(model, n_vocab);
  vision(mmproj);
  std::printf("engine faults: OK (%d checks)\n", g_checks);
  return 0;
}
