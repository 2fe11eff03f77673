//! Space: the pool file and what hands out its clusters. The pool moves bytes (io_uring or
//! threads, O_DIRECT, behind the `BlockStore` trait so a fault-injecting disk can stand in);
//! the allocator decides which clusters are free; grace periods keep a freed cluster from
//! being reused under a read still using it; the superblock ties the file to its metadata.

pub mod allocator;
pub mod backend;
#[cfg(any(test, feature = "testing"))]
pub mod fault_disk;
pub mod grace;
pub mod pool;
pub mod superblock;
pub mod uring;
