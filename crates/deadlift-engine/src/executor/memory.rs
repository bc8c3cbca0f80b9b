//! Extism memory: the byte space, separate from the guest's linear memory, through which
//! host and guest exchange input, output, errors, config, vars and host-function
//! arguments.
//!
//! The Extism SDK keeps this memory inside a Wasm "kernel" module and reaches it through
//! wasm calls; we keep it on the host as a `Vec<u8>` with a block list, which is what makes
//! our call path cheap. The observable contract (`docs/extism-abi.md`) is reproduced exactly:
//! handles are offsets (never 0) to contiguous blocks, `alloc(0)` is 0, `length` is 0 for
//! anything but the start of a live block, freed blocks are reused first-fit, and every
//! load or store outside the memory is forgiven (0 / dropped), never a trap.
//!
//! Growth is reported in whole Wasm pages so that the caller can charge it against the
//! instance's memory budget, as the SDK's limiter charges the kernel's `memory.grow`.
//! What is charged is everything this memory holds from the allocator: the bytes and the
//! block list (a guest making millions of one-byte blocks pays for their bookkeeping),
//! grown by a quarter at a time and never beyond what was charged. As the SDK does not
//! charge the kernel's initial memory, the first [`FREE_PAGES`] are not charged.

/// Offset of the first block: handles are never 0, and 8 keeps `u64` access aligned.
const BASE: u64 = 8;
/// What an idle instance's Extism memory keeps between calls: enough for the common
/// small call not to allocate, no more.
const RETAINED_BYTES: usize = 64 * 1024;
const RETAINED_BLOCKS: usize = 64;
/// Wasm page size: growth of this memory is charged to the budget in these units.
pub const PAGE_SIZE: u64 = 65_536;
/// A freed block is split when reuse would waste at least this many bytes (as the kernel).
const SPLIT_THRESHOLD: u64 = 128;
/// The Extism kernel's initial memory (16 pages), which the SDK's `max_pages` does not
/// count: this memory's first pages are not charged either.
pub const FREE_PAGES: u64 = 16;
/// What one block's bookkeeping holds.
const BLOCK_BYTES: u64 = std::mem::size_of::<Block>() as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    offset: u64,
    size: u64,
    used: u64,
    live: bool,
}

/// What `alloc` needs from the caller when the memory must grow: permission for `pages`
/// more Wasm pages. Returning `Err` aborts the allocation with that error.
pub trait GrowthBudget {
    type Error;
    fn grow(&mut self, pages: u64) -> Result<(), Self::Error>;
}

/// The Extism memory of one instance. See the module documentation for the contract.
#[derive(Debug)]
pub struct ExtismMemory {
    /// Bytes `0..BASE` are never handed out. `data.len()` is the end of the last block.
    data: Vec<u8>,
    /// All blocks, sorted by offset and contiguous from `BASE` to `data.len()`.
    blocks: Vec<Block>,
    /// How many blocks are free (not live): lets `alloc` skip the first-fit scan.
    free_blocks: usize,
    /// The most pages this memory has held (bytes and bookkeeping); what beyond
    /// [`FREE_PAGES`] was charged. Like the kernel's memory it never shrinks.
    pages: u64,
    input: (u64, u64),
    output: (u64, u64),
    error: u64,
}

impl Default for ExtismMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl ExtismMemory {
    pub fn new() -> Self {
        Self {
            data: vec![0; BASE as usize],
            blocks: Vec::new(),
            free_blocks: 0,
            pages: 0,
            input: (0, 0),
            output: (0, 0),
            error: 0,
        }
    }

    /// Step 1 of a call: release and zero everything; clear input, output and error.
    pub fn reset(&mut self) {
        // Zeroing only what was used keeps a reset proportional to the last call's work.
        self.data.fill(0);
        self.data.truncate(BASE as usize);
        self.blocks.clear();
        self.free_blocks = 0;
        self.input = (0, 0);
        self.output = (0, 0);
        self.error = 0;
    }

    /// Between calls: like [`reset`](Self::reset), and gives back to the allocator what
    /// the last call needed beyond a small floor, so that an idle warm instance does not
    /// keep the peak of its busiest call.
    pub fn release(&mut self) {
        self.reset();
        self.data.shrink_to(RETAINED_BYTES);
        self.blocks.shrink_to(RETAINED_BLOCKS);
    }

    /// Bytes this memory holds from the allocator.
    #[cfg(test)]
    pub fn retained_bytes(&self) -> usize {
        self.data.capacity() + self.blocks.capacity() * std::mem::size_of::<Block>()
    }

    /// The most pages this memory has held so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Makes room for `data_len` bytes and `blocks` blocks, charging the budget first for
    /// whatever that makes this memory hold beyond its high-water mark.
    fn reserve<B: GrowthBudget>(
        &mut self,
        data_len: usize,
        blocks: usize,
        budget: &mut B,
    ) -> Result<(), B::Error> {
        // Whole pages at a time, as the kernel grows: never more charged than a page
        // beyond what is used (large reallocations are remaps, not copies).
        let page = PAGE_SIZE as usize;
        let grown = |capacity: usize, needed: usize, unit: usize| {
            if needed <= capacity {
                capacity
            } else {
                needed.next_multiple_of(unit)
            }
        };
        let data_capacity = grown(self.data.capacity(), data_len, page);
        let block_capacity = grown(self.blocks.capacity(), blocks, page / BLOCK_BYTES as usize);
        let footprint = data_capacity as u64 + block_capacity as u64 * BLOCK_BYTES;
        let pages = footprint.div_ceil(PAGE_SIZE);
        if pages > self.pages {
            let charged = pages.saturating_sub(FREE_PAGES) - self.pages.saturating_sub(FREE_PAGES);
            if charged > 0 {
                budget.grow(charged)?;
            }
            self.pages = pages;
        }
        self.data.reserve_exact(data_capacity - self.data.len());
        self.blocks
            .reserve_exact(block_capacity - self.blocks.len());
        Ok(())
    }

    /// `alloc(len)`: a handle to a fresh block of `len` bytes, or 0 for `len == 0`.
    pub fn alloc<B: GrowthBudget>(&mut self, len: u64, budget: &mut B) -> Result<u64, B::Error> {
        if len == 0 {
            return Ok(0);
        }
        if self.free_blocks > 0
            && let Some(index) = self.blocks.iter().position(|b| !b.live && b.size >= len)
        {
            // A split adds a block: room for it first.
            self.reserve(self.data.len(), self.blocks.len() + 1, budget)?;
            return Ok(self.reuse_free_block(index, len));
        }
        let offset = self.data.len() as u64;
        let Some(end) = offset
            .checked_add(len)
            .and_then(|end| usize::try_from(end).ok())
        else {
            // No memory this large can be held: refused as any growth over budget is.
            budget.grow(u64::MAX)?;
            return Ok(0);
        };
        self.reserve(end, self.blocks.len() + 1, budget)?;
        self.data.resize(end, 0);
        self.blocks.push(Block {
            offset,
            size: len,
            used: len,
            live: true,
        });
        Ok(offset)
    }

    fn reuse_free_block(&mut self, index: usize, len: u64) -> u64 {
        let block = &mut self.blocks[index];
        let spare = block.size - len;
        block.live = true;
        block.used = len;
        let offset = block.offset;
        if spare >= SPLIT_THRESHOLD {
            block.size = len;
            self.blocks.insert(
                index + 1,
                Block {
                    offset: offset + len,
                    size: spare,
                    used: 0,
                    live: false,
                },
            );
        } else {
            self.free_blocks -= 1;
        }
        // A reused block starts zeroed, as a fresh one does.
        self.data[offset as usize..(offset + len) as usize].fill(0);
        offset
    }

    fn live_block(&self, handle: u64) -> Option<usize> {
        let index = self
            .blocks
            .binary_search_by_key(&handle, |b| b.offset)
            .ok()?;
        self.blocks[index].live.then_some(index)
    }

    /// `free(handle)`: marks a live block free; anything else is ignored.
    pub fn free(&mut self, handle: u64) {
        if let Some(index) = self.live_block(handle) {
            self.blocks[index].live = false;
            self.free_blocks += 1;
            if handle == self.input.0 {
                self.input.1 = 0;
            }
        }
    }

    /// `length(handle)`: the used length of a live block, 0 for anything else.
    pub fn length(&self, handle: u64) -> u64 {
        self.live_block(handle)
            .map_or(0, |index| self.blocks[index].used)
    }

    /// The bytes of the live block at `handle`, or `None` if it is not one (0 is empty).
    pub fn block(&self, handle: u64) -> Option<&[u8]> {
        if handle == 0 {
            return Some(&[]);
        }
        let index = self.live_block(handle)?;
        let block = self.blocks[index];
        Some(&self.data[block.offset as usize..(block.offset + block.used) as usize])
    }

    /// A fresh block holding `bytes`; 0 for empty input (as the SDK's `memory_new`).
    pub fn write_new<B: GrowthBudget>(
        &mut self,
        bytes: &[u8],
        budget: &mut B,
    ) -> Result<u64, B::Error> {
        let handle = self.alloc(bytes.len() as u64, budget)?;
        if handle != 0 {
            self.data[handle as usize..handle as usize + bytes.len()].copy_from_slice(bytes);
        }
        Ok(handle)
    }

    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset >= BASE
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.data.len() as u64)
    }

    pub fn load_u8(&self, offset: u64) -> u8 {
        if self.in_bounds(offset, 1) {
            self.data[offset as usize]
        } else {
            0
        }
    }

    pub fn load_u64(&self, offset: u64) -> u64 {
        if self.in_bounds(offset, 8) {
            let start = offset as usize;
            let mut word = [0u8; 8];
            word.copy_from_slice(&self.data[start..start + 8]);
            u64::from_le_bytes(word)
        } else {
            0
        }
    }

    pub fn store_u8(&mut self, offset: u64, value: u8) {
        if self.in_bounds(offset, 1) {
            self.data[offset as usize] = value;
        }
    }

    pub fn store_u64(&mut self, offset: u64, value: u64) {
        if self.in_bounds(offset, 8) {
            let start = offset as usize;
            self.data[start..start + 8].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Makes the block at `handle` the call's input.
    pub fn set_input(&mut self, handle: u64, len: u64) {
        self.input = (handle, len);
    }

    pub fn input_offset(&self) -> u64 {
        self.input.0
    }

    pub fn input_length(&self) -> u64 {
        self.input.1
    }

    pub fn input_load_u8(&self, index: u64) -> u8 {
        if index < self.input.1 {
            self.load_u8(self.input.0 + index)
        } else {
            0
        }
    }

    pub fn input_load_u64(&self, index: u64) -> u64 {
        if index.checked_add(8).is_some_and(|end| end <= self.input.1) {
            self.load_u64(self.input.0 + index)
        } else {
            0
        }
    }

    /// `output_set(offset, len)`: ignored unless the range lies inside the memory.
    pub fn set_output(&mut self, offset: u64, len: u64) {
        if self.in_bounds(offset, len.max(1)) {
            self.output = (offset, len);
        }
    }

    /// The `(offset, length)` last accepted by `output_set`.
    pub fn output_range(&self) -> (u64, u64) {
        self.output
    }

    pub fn output(&self) -> &[u8] {
        let (offset, len) = self.output;
        if len == 0 || !self.in_bounds(offset, len) {
            return &[];
        }
        &self.data[offset as usize..(offset + len) as usize]
    }

    /// `error_set(handle)`: 0 clears; an offset outside the memory is ignored.
    pub fn set_error(&mut self, handle: u64) {
        if handle == 0 || self.in_bounds(handle, 1) {
            self.error = handle;
        }
    }

    pub fn error_handle(&self) -> u64 {
        self.error
    }

    /// The error message, if one was set: a live block with a non-zero length, as the SDK
    /// decides (an `error_set` on anything else does not fail the call).
    pub fn error(&self) -> Option<&[u8]> {
        if self.error == 0 {
            return None;
        }
        self.block(self.error).filter(|bytes| !bytes.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget that allows a fixed number of pages.
    struct Pages(u64);
    impl GrowthBudget for Pages {
        type Error = &'static str;
        fn grow(&mut self, pages: u64) -> Result<(), Self::Error> {
            if pages > self.0 {
                return Err("over budget");
            }
            self.0 -= pages;
            Ok(())
        }
    }

    fn unlimited() -> Pages {
        Pages(u64::MAX)
    }

    #[test]
    fn alloc_zero_is_null_and_handles_are_never_zero() {
        let mut mem = ExtismMemory::new();
        assert_eq!(mem.alloc(0, &mut unlimited()), Ok(0));
        let h = mem.alloc(3, &mut unlimited()).unwrap();
        assert_ne!(h, 0);
        assert_eq!(mem.length(h), 3);
        assert_eq!(mem.length(h + 1), 0, "only a block start has a length");
        assert_eq!(mem.length(0), 0);
    }

    #[test]
    fn blocks_are_contiguous_and_loads_are_forgiving() {
        let mut mem = ExtismMemory::new();
        let h = mem.write_new(b"hello world!", &mut unlimited()).unwrap();
        assert_eq!(mem.load_u8(h), b'h');
        assert_eq!(mem.load_u64(h), u64::from_le_bytes(*b"hello wo"));
        assert_eq!(mem.load_u8(h + 1000), 0);
        assert_eq!(mem.load_u64(h + 8), 0, "a u64 crossing the end reads 0");
        assert_eq!(mem.load_u8(0), 0);
        mem.store_u8(h + 1000, 1);
        mem.store_u64(u64::MAX - 3, 1);
        mem.store_u64(h, u64::from_le_bytes(*b"HELLO WO"));
        assert_eq!(mem.block(h).unwrap(), b"HELLO WOrld!");
    }

    #[test]
    fn freed_blocks_are_reused_first_fit_and_split() {
        let mut mem = ExtismMemory::new();
        let big = mem.alloc(1000, &mut unlimited()).unwrap();
        let small = mem.alloc(10, &mut unlimited()).unwrap();
        mem.free(big);
        assert_eq!(mem.length(big), 0);
        let reused = mem.alloc(100, &mut unlimited()).unwrap();
        assert_eq!(reused, big, "first fit reuses the freed block");
        assert_eq!(mem.length(reused), 100);
        let rest = mem.alloc(800, &mut unlimited()).unwrap();
        assert_eq!(rest, big + 100, "the split remainder is reused too");
        assert_eq!(mem.length(small), 10);
        mem.free(small);
        mem.free(small);
        assert_eq!(mem.alloc(10, &mut unlimited()).unwrap(), small);
    }

    #[test]
    fn reused_blocks_start_zeroed() {
        let mut mem = ExtismMemory::new();
        let h = mem.write_new(b"secret", &mut unlimited()).unwrap();
        mem.free(h);
        let again = mem.alloc(6, &mut unlimited()).unwrap();
        assert_eq!(again, h);
        assert_eq!(mem.block(again).unwrap(), &[0; 6]);
    }

    #[test]
    fn release_gives_back_what_a_big_call_needed() {
        let mut memory = ExtismMemory::new();
        let mut budget = unlimited();
        for _ in 0..10_000 {
            memory.alloc(100, &mut budget).unwrap();
        }
        assert!(memory.retained_bytes() > 1_000_000);
        memory.release();
        assert!(memory.retained_bytes() <= RETAINED_BYTES + RETAINED_BLOCKS * 64);
        // And it works as before afterwards.
        let handle = memory.alloc(3, &mut budget).unwrap();
        assert_eq!(handle, BASE);
    }

    #[test]
    fn reset_releases_and_zeroes_everything() {
        let mut mem = ExtismMemory::new();
        let h = mem.write_new(b"input", &mut unlimited()).unwrap();
        let pages = mem.pages();
        mem.set_input(h, 5);
        mem.set_output(h, 5);
        mem.set_error(h);
        mem.reset();
        assert_eq!(mem.input_length(), 0);
        assert_eq!(mem.output(), b"");
        assert_eq!(mem.error(), None);
        assert_eq!(mem.length(h), 0);
        assert_eq!(mem.load_u8(h), 0);
        assert_eq!(mem.pages(), pages, "charged pages are never returned");
    }

    #[test]
    fn input_loads_stop_at_the_input_length() {
        let mut mem = ExtismMemory::new();
        let h = mem.write_new(b"abcdefghij", &mut unlimited()).unwrap();
        mem.set_input(h, 10);
        assert_eq!(mem.input_load_u8(9), b'j');
        assert_eq!(mem.input_load_u8(10), 0);
        assert_eq!(mem.input_load_u64(2), u64::from_le_bytes(*b"cdefghij"));
        assert_eq!(mem.input_load_u64(3), 0);
        assert_eq!(mem.input_load_u64(u64::MAX), 0);
        mem.free(h);
        assert_eq!(mem.input_length(), 0, "freeing the input empties it");
    }

    #[test]
    fn output_and_error_with_invalid_handles_are_ignored() {
        let mut mem = ExtismMemory::new();
        let h = mem.write_new(b"out", &mut unlimited()).unwrap();
        mem.set_output(h, 3);
        mem.set_output(h, 1 << 40);
        assert_eq!(mem.output(), b"out");
        mem.set_error(1 << 40);
        assert_eq!(mem.error(), None);
        mem.set_error(h + 1);
        assert_eq!(
            mem.error(),
            None,
            "an error that is not a block start is no error"
        );
        mem.set_error(h);
        assert_eq!(mem.error(), Some(&b"out"[..]));
        mem.set_error(0);
        assert_eq!(mem.error(), None);
    }

    #[test]
    fn growth_is_charged_in_pages_and_refused_over_budget() {
        let mut mem = ExtismMemory::new();
        let mut budget = Pages(2);
        // The first pages are free, as the kernel's initial memory is in the SDK.
        mem.alloc((FREE_PAGES - 2) * PAGE_SIZE, &mut budget)
            .unwrap();
        assert_eq!(budget.0, 2);
        mem.alloc(PAGE_SIZE, &mut budget).unwrap();
        assert!(budget.0 < 2, "growth past the free pages is charged");
        assert_eq!(mem.alloc(4 * PAGE_SIZE, &mut budget), Err("over budget"));
        assert_eq!(mem.alloc(10, &mut budget).map(|h| h > 0), Ok(true));
        assert_eq!(mem.alloc(u64::MAX - 1, &mut budget), Err("over budget"));
    }

    /// Issue 12: 16 million `alloc(1)` under a 16 MiB budget grew the agent by ~520 MB:
    /// the blocks' bookkeeping was not charged. Everything held counts now.
    #[test]
    fn the_bookkeeping_of_many_small_blocks_is_charged() {
        let mut mem = ExtismMemory::new();
        let mut budget = Pages(16);
        let mut blocks = 0u64;
        while mem.alloc(1, &mut budget).is_ok() {
            blocks += 1;
        }
        let held = mem.retained_bytes() as u64;
        assert!(
            held <= (16 + FREE_PAGES) * PAGE_SIZE,
            "{blocks} blocks hold {held} bytes"
        );
        assert!(
            blocks * (1 + BLOCK_BYTES) <= held,
            "{blocks} blocks in {held} bytes"
        );
    }
}
