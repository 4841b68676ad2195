// A probe, not part of the package: the decoder's step attention (decode_attention and cross_attention of
// core/cpu/_cpu_kernels.c) as MLX primitives, so that a decoder step stays one MLX graph with one evaluation.
//
// The kernels are not compiled in: they are looked up in the process (dlsym) where core.preload_backend() has
// loaded core/cpu/_cpu_kernels*.so globally, so the primitives share the products' thread pool instead of
// starting a second one on the same cores.

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

using decode_fn = int (*)(int, int, int, float, const float*, const float*, const float*, float*, float*, long,
                          float*);
using cross_fn = int (*)(int, int, int, int, float, const float*, const float*, const float*, const uint8_t*,
                         float*);

template <typename F>
F kernel(const char* name) {
  void* symbol = dlsym(RTLD_DEFAULT, name);
  if (!symbol) {
    throw std::runtime_error(std::string(name) + " is not loaded: call core.preload_backend() before MLX");
  }
  return reinterpret_cast<F>(symbol);
}

void check_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + " must be float32");
}

// One position of self-attention: writes k/v at position length - 1 of the caches, attends positions
// 0 .. length-1, returns the attention (like q).
//
// The caches are written in place, as core.musicgen's HostKVCache writes its NumPy arrays today: MLX arrays are
// immutable, and the way MLX itself updates a cache without a copy (donating an input whose only reference is
// the graph) never applies to a primitive with several outputs, because every output holds its own reference
// to every input. So the caches are inputs that the cache object owns alone and never reads lazily.
class StepAttention : public mx::Primitive {
 public:
  StepAttention(mx::Stream stream, int length, float scale) : mx::Primitive(stream), length_(length), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const auto& k_cache = inputs[3];
    const auto& v_cache = inputs[4];
    if (!k_cache.flags().row_contiguous || !v_cache.flags().row_contiguous) {
      throw std::invalid_argument("the caches must be evaluated, row-contiguous arrays");
    }
    int B = k_cache.shape(0), H = k_cache.shape(1), capacity = k_cache.shape(2), D = k_cache.shape(3);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(),
                      k_cache = const_cast<float*>(k_cache.data<float>()),
                      v_cache = const_cast<float*>(v_cache.data<float>()), out = out.data<float>(), BH = B * H,
                      L = length_, D, capacity, scale = scale_]() {
      static decode_fn attend = kernel<decode_fn>("decode_attention");
      if (attend(BH, L, D, scale, q, k, v, k_cache, v_cache, capacity, out) != 0) {
        throw std::runtime_error("decode_attention refused its shapes");
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("StepAttention has no GPU kernel (a Metal build would need one, or a fallback)");
  }

  const char* name() const override { return "StepAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const StepAttention&>(other);
    return length_ == o.length_ && scale_ == o.scale_;
  }

 private:
  int length_;
  float scale_;
};

// One position of cross-attention over S keys/values with a (B, S) mask.
class CrossAttention : public mx::Primitive {
 public:
  CrossAttention(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    int B = inputs[1].shape(0), H = inputs[1].shape(1), S = inputs[1].shape(2), D = inputs[1].shape(3);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(),
                      mask = inputs[3].data<uint8_t>(), out = out.data<float>(), B, H, S, D, scale = scale_]() {
      static cross_fn attend = kernel<cross_fn>("cross_attention");
      if (attend(B, H, S, D, scale, q, k, v, mask, out) != 0) {
        throw std::runtime_error("cross_attention refused its shapes");
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("CrossAttention has no GPU kernel (a Metal build would need one, or a fallback)");
  }

  const char* name() const override { return "CrossAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const CrossAttention&>(other).scale_;
  }

 private:
  float scale_;
};

// Also a primitive that does nothing but copy its input's pointer into a new output, for the per-call overhead.
class Nothing : public mx::Primitive {
 public:
  explicit Nothing(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    outputs[0].copy_shared_buffer(inputs[0]);
  }
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    outputs[0].copy_shared_buffer(inputs[0]);
  }
  const char* name() const override { return "Nothing"; }
};

mx::array step_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                      const mx::array& k_cache, const mx::array& v_cache, int length, float scale,
                                      mx::StreamOrDevice s) {
  for (auto* a : {&q, &k, &v, &k_cache, &v_cache}) check_float32(*a, "q, k, v and the caches");
  if (k_cache.ndim() != 4 || k_cache.shape() != v_cache.shape()) throw std::invalid_argument("caches (B, H, N, D)");
  int B = k_cache.shape(0), H = k_cache.shape(1), D = k_cache.shape(3);
  if (length < 1 || length > k_cache.shape(2)) throw std::invalid_argument("length outside 1 .. capacity");
  for (auto* a : {&q, &k, &v}) {
    if (a->size() != static_cast<size_t>(B) * H * D) throw std::invalid_argument("q, k, v: one position per row");
  }
  auto stream = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  return mx::array(q.shape(), mx::float32, std::make_shared<StepAttention>(stream, length, scale),
                   {c(q), c(k), c(v), k_cache, v_cache});
}

mx::array cross_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& mask,
                          float scale, mx::StreamOrDevice s) {
  for (auto* a : {&q, &k, &v}) check_float32(*a, "q, k and v");
  if (k.ndim() != 4 || k.shape() != v.shape()) throw std::invalid_argument("k, v (B, H, S, D)");
  int B = k.shape(0), H = k.shape(1), S = k.shape(2), D = k.shape(3);
  if (q.size() != static_cast<size_t>(B) * H * D) throw std::invalid_argument("q: one position per row");
  if (mask.size() != static_cast<size_t>(B) * S) throw std::invalid_argument("mask: (B, S)");
  auto stream = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  return mx::array(q.shape(), mx::float32, std::make_shared<CrossAttention>(stream, scale),
                   {c(q), c(k), c(v), c(mx::astype(mask, mx::uint8, stream))});
}

mx::array nothing(const mx::array& x, mx::StreamOrDevice s) {
  return mx::array(x.shape(), x.dtype(), std::make_shared<Nothing>(mx::to_stream(s)), {x});
}

}  // namespace

NB_MODULE(_step_attention, m) {
  m.doc() = "Probe: the CPU kernels' step attention as MLX primitives";
  m.def("step_attention", &step_attention, "q"_a, "k"_a, "v"_a, "k_cache"_a, "v_cache"_a, "length"_a, "scale"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "One position of self-attention (out like q); writes k, v into the caches at length - 1, in place.");
  m.def("cross_attention", &cross_attention, "q"_a, "k"_a, "v"_a, "mask"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "One position of cross-attention over (B, H, S, D) keys/values, mask (B, S).");
  m.def("nothing", &nothing, "x"_a, nb::kw_only(), "stream"_a = nb::none(), "A primitive that returns its input.");
}
