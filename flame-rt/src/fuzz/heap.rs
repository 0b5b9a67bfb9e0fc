//! Counting what the process holds on the heap.

/// A global allocator that counts the bytes allocated and not yet freed while counting is on,
/// and their peak, for benches and tests that measure what flame-rt holds
/// (`#[global_allocator] static A: HeapCounter = HeapCounter;`). Off, it costs one relaxed load
/// per allocation.
pub struct HeapCounter;

static HEAP: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static PEAK: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl HeapCounter {
    /// Starts counting (from here, the peak is the current count) or stops it.
    pub fn counting(on: bool) {
        PEAK.store(Self::net(), std::sync::atomic::Ordering::SeqCst);
        COUNTING.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Net bytes allocated while counting was on.
    pub fn net() -> isize {
        HEAP.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The highest [`net`](Self::net) since counting started.
    pub fn peak() -> isize {
        PEAK.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for HeapCounter {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            let size = layout.size() as isize;
            let now = HEAP.fetch_add(size, std::sync::atomic::Ordering::Relaxed) + size;
            PEAK.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            HEAP.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}
