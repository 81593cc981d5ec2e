// pkm/page_buffer.hpp — memory straight from the kernel for large buffers written once: zero,
// 2 MiB-aligned and advised to huge pages, never touched by pkm where nobody writes (a page
// nobody writes costs nothing, a page written one fault per 2 MiB). What a value gradient's
// rows go into when they become a tensor's (the PyTorch operator) or are summed over several
// backwards (pkm::RowAccumulator).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "pkm/detail/aligned_buffer.hpp"

namespace pkm {

/// n elements of T in pages straight from the kernel: zero, 2 MiB-aligned and advised to huge
/// pages, and never written here, so a page nobody writes costs nothing and a page written
/// costs one fault per 2 MiB. For large buffers written once (a gradient handed to a tensor
/// that then owns it). Released with release(), or handed over with a deleter that calls
/// PageBuffer::free_pages(p, bytes).
template <class T>
class PageBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "PageBuffer holds trivially copyable types");

 public:
  explicit PageBuffer(std::size_t n) : bytes_(rounded_bytes(n)) {
#if defined(__linux__)
    // Map one huge page more than needed, then unmap the ends so the rest is 2 MiB-aligned
    // (small buffers: whole 4 KiB pages, no alignment needed).
    const std::size_t align = bytes_ >= detail::kHugePage ? detail::kHugePage : std::size_t{4096};
    const std::size_t span = bytes_ + (align == detail::kHugePage ? detail::kHugePage : 0);
    void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    const auto b = reinterpret_cast<std::uintptr_t>(base);
    const std::uintptr_t aligned = (b + align - 1) / align * align;
    if (aligned > b) munmap(base, aligned - b);
    const std::uintptr_t end = b + span, used_end = aligned + bytes_;
    if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
    p_ = reinterpret_cast<T*>(aligned);
#if defined(MADV_HUGEPAGE)
    if (align == detail::kHugePage) (void)madvise(p_, bytes_, MADV_HUGEPAGE);
#endif
#else
    p_ = static_cast<T*>(std::calloc(1, bytes_));
    if (p_ == nullptr) throw std::bad_alloc();
#endif
  }
  ~PageBuffer() {
    if (p_ != nullptr) free_pages(p_, bytes_);
  }
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;

  T* data() { return p_; }
  std::size_t bytes() const { return bytes_; }
  /// Gives up ownership: the caller frees with free_pages(p, bytes()).
  T* release() {
    T* p = p_;
    p_ = nullptr;
    return p;
  }
  static void free_pages(void* p, std::size_t bytes) {
#if defined(__linux__)
    munmap(p, bytes);
#else
    (void)bytes;
    std::free(p);
#endif
  }

 private:
  static std::size_t rounded_bytes(std::size_t n) {
    if (n > (std::size_t(-1) / 4) / sizeof(T)) {
      throw std::length_error("pkm: buffer of " + std::to_string(n) + " elements is too large");
    }
    const std::size_t bytes = std::max<std::size_t>(n, 1) * sizeof(T);
    const std::size_t page = bytes >= detail::kHugePage ? detail::kHugePage : std::size_t{4096};
    return (bytes + page - 1) / page * page;
  }
  T* p_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace pkm
