// pkm/detail/aligned_buffer.hpp — an owning, aligned, zero-initialised array. Large buffers
// are 2 MiB-aligned and advised to use transparent huge pages (fewer TLB misses when rows are
// read at random from a big value table).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pkm::detail {

inline constexpr std::size_t kHugePage = std::size_t{2} << 20;

/// Asks the kernel to back the whole 2 MiB pages inside [p, p + bytes) with transparent huge
/// pages (where it allows them on request, "madvise" mode). Only useful before the memory is
/// first touched: a fresh large allocation then takes one page fault per 2 MiB instead of one
/// per 4 KiB. A no-op elsewhere and for small ranges.
inline void advise_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t first = (begin + kHugePage - 1) / kHugePage * kHugePage;
  const std::uintptr_t last = (begin + bytes) / kHugePage * kHugePage;
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

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
    const std::size_t align = bytes_ >= kHugePage ? kHugePage : std::size_t{4096};
    const std::size_t span = bytes_ + (align == kHugePage ? kHugePage : 0);
    void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    const auto b = reinterpret_cast<std::uintptr_t>(base);
    const std::uintptr_t aligned = (b + align - 1) / align * align;
    if (aligned > b) munmap(base, aligned - b);
    const std::uintptr_t end = b + span, used_end = aligned + bytes_;
    if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
    p_ = reinterpret_cast<T*>(aligned);
#if defined(MADV_HUGEPAGE)
    if (align == kHugePage) (void)madvise(p_, bytes_, MADV_HUGEPAGE);
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
    const std::size_t page = bytes >= kHugePage ? kHugePage : std::size_t{4096};
    return (bytes + page - 1) / page * page;
  }
  T* p_ = nullptr;
  std::size_t bytes_ = 0;
};

template <class T>
class AlignedBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "AlignedBuffer holds trivially copyable types");

 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t n) : size_(n) {
    if (n == 0) return;
    if (n > (std::size_t(-1) / 2) / sizeof(T)) {
      throw std::length_error("pkm: buffer of " + std::to_string(n) + " elements is too large");
    }
    const std::size_t bytes = n * sizeof(T);
    const std::size_t align = bytes >= kHugePage ? kHugePage : std::size_t{64};
    const std::size_t rounded = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
    std::memset(p, 0, rounded);
    data_.reset(static_cast<T*>(p));
  }
  AlignedBuffer(const AlignedBuffer& o) : AlignedBuffer(o.size_) {
    if (size_) std::memcpy(data_.get(), o.data_.get(), size_ * sizeof(T));
  }
  AlignedBuffer& operator=(const AlignedBuffer& o) {
    if (this != &o) *this = AlignedBuffer(o);
    return *this;
  }
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(std::move(o.data_)), size_(o.size_) {
    o.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    data_ = std::move(o.data_);
    size_ = o.size_;
    o.size_ = 0;
    return *this;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  std::size_t size_ = 0;
};

}  // namespace pkm::detail
