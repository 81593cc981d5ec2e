// The CUDA side of the GPU tests (see runner.hpp): copies in, one pkm::cuda call, copies out.
#include "runner.hpp"

#include <pkm/cuda/embedding_bag.cuh>

namespace pkm_cuda_test {
namespace {

/// A device buffer freed on scope exit.
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(std::size_t bytes) {
    if (bytes > 0 && cudaMalloc(&p, bytes) != cudaSuccess) p = nullptr;
  }
  ~DeviceBuffer() {
    if (p != nullptr) cudaFree(p);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <class T>
void upload(DeviceBuffer& d, const std::vector<T>& h) {
  if (!h.empty()) cudaMemcpy(d.p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
}
template <class T>
void download(std::vector<T>& h, const void* d, std::size_t n) {
  h.resize(n);
  if (n > 0) cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
}

/// A pkm::cuda call the way a caller makes it: the workspace query (null workspace), a buffer
/// of that size, the call, and a synchronisation (a kernel fault shows as cuda_error).
template <class Fn, class Args>
pkm::cuda::Status call_with_workspace(Fn fn, const Args& a, std::string* why) {
  std::size_t bytes = 0;
  pkm::cuda::Status s = fn(a, nullptr, &bytes, nullptr, why);
  if (s != pkm::cuda::Status::ok) return s;
  DeviceBuffer ws(bytes);
  s = fn(a, ws.p, &bytes, nullptr, why);
  if (cudaDeviceSynchronize() != cudaSuccess && s == pkm::cuda::Status::ok)
    s = pkm::cuda::Status::cuda_error;
  return s;
}

}  // namespace

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why != nullptr) *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    return false;
  }
  return true;
}

ForwardResult run_forward(const HostTable& table, const ForwardCall& call) {
  ForwardResult r;
  DeviceBuffer t(table.bytes.size()), idx(call.indices.size() * 8), w(call.weights.size() * 4),
      wo(call.weights.size() * 4), out(std::size_t(call.tokens * call.out_stride) * 4);
  upload(t, table.bytes);
  upload(idx, call.indices);
  upload(w, call.weights);
  pkm::cuda::ForwardArgs a;
  a.table = {t.p, table.dtype, table.rows, table.dim, table.stride};
  a.bag = {idx.as<std::int64_t>(), call.tokens, call.heads, call.knn};
  a.weights = w.as<float>();
  a.fused_softmax = call.softmax;
  a.weights_out = wo.as<float>();
  a.out = out.as<float>();
  a.out_stride = call.out_stride;
  a.check_indices = call.check;
  if (call.tokens > 0)
    cudaMemset(out.p, 0xff,
               std::size_t(call.tokens * call.out_stride) * 4);  // NaN: unwritten shows
  r.status = call_with_workspace(pkm::cuda::embedding_bag_forward, a, &r.why);
  download(r.out, out.p, std::size_t(call.tokens * call.out_stride));
  if (call.softmax) download(r.weights, wo.p, call.weights.size());
  return r;
}

BackwardResult run_backward(const HostTable& table, const BackwardCall& call) {
  BackwardResult r;
  const std::size_t n = call.indices.size(), dim = std::size_t(table.dim);
  DeviceBuffer t(table.bytes.size()), idx(n * 8), w(n * 4), dy(call.dy.size() * 4), dw(n * 4),
      uniq(n * 8), rows(n * dim * 4), count(8), dense(call.dense.size() * 4);
  upload(t, table.bytes);
  upload(idx, call.indices);
  upload(w, call.weights);
  upload(dy, call.dy);
  upload(dense, call.dense);
  pkm::cuda::BackwardArgs a;
  a.table = {t.p, table.dtype, table.rows, table.dim, table.stride};
  a.bag = {idx.as<std::int64_t>(), call.tokens, call.heads, call.knn};
  a.weights = w.as<float>();
  a.dy = dy.as<float>();
  a.dy_stride = table.dim;
  a.dweights = call.want_dweights ? dw.as<float>() : nullptr;
  a.softmax_backward = call.softmax_backward;
  a.output = call.output;
  a.reduction = call.reduction;
  a.unique_slots = uniq.as<std::int64_t>();
  a.grad_rows = rows.as<float>();
  a.num_unique = count.as<std::int64_t>();
  a.dense = dense.as<float>();
  a.dense_stride = table.dim;
  a.check_indices = call.check;
  r.status = call_with_workspace(pkm::cuda::embedding_bag_backward, a, &r.why);
  if (r.status != pkm::cuda::Status::ok) return r;
  if (call.output == pkm::cuda::GradOutput::sparse) {
    std::int64_t u = 0;
    cudaMemcpy(&u, count.p, 8, cudaMemcpyDeviceToHost);
    download(r.unique, uniq.p, std::size_t(u));
    download(r.rows, rows.p, std::size_t(u) * dim);
  } else {
    download(r.dense, dense.p, call.dense.size());
  }
  if (call.want_dweights) download(r.dweights, dw.p, n);
  return r;
}

}  // namespace pkm_cuda_test
