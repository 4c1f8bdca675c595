//! [`Communicator`] over NCCL, through cudarc's bindings (`libnccl.so.2` loaded at run time, as
//! cuBLAS is): one communicator per GPU of this host, created together (`ncclCommInitAll`), each
//! all-reduce on its GPU's default stream. The buffer is the host's: a step's adapter gradients
//! are megabytes, copied to the GPU, summed by NCCL, copied back.

use cudarc::driver::CudaContext;
use cudarc::nccl::{Comm, ReduceOp};

use super::{CollectiveError, Communicator};

/// One GPU's communicator in a group made by [`Nccl::group`].
#[derive(Debug)]
pub struct Nccl {
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; each `Nccl` is
// owned by one worker thread, which alone calls it.
unsafe impl Send for Nccl {}

impl Nccl {
    /// One communicator per GPU ordinal in `gpus`: rank `i` on `gpus[i]`.
    pub fn group(gpus: &[usize]) -> Result<Vec<Nccl>, String> {
        let mut streams = Vec::with_capacity(gpus.len());
        for &ordinal in gpus {
            let context = CudaContext::new(ordinal)
                .map_err(|e| format!("opening GPU {ordinal} for NCCL: {e:?}"))?;
            streams.push(context.default_stream());
        }
        let comms = Comm::from_devices(streams).map_err(|e| {
            format!(
                "creating NCCL communicators on GPUs {gpus:?}: {e:?} (is libnccl.so.2 on the library path? PyTorch's wheel ships one under site-packages/nvidia/nccl/lib)"
            )
        })?;
        Ok(comms.into_iter().map(|comm| Nccl { comm }).collect())
    }

    fn failed(&self, what: &str, e: impl std::fmt::Debug) -> CollectiveError {
        CollectiveError::Failed {
            rank: self.comm.rank(),
            reason: format!("{what}: {e:?}"),
        }
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let stream = self.comm.stream();
        let mut buffer = stream
            .clone_htod(values)
            .map_err(|e| self.failed("copying the gradients to the GPU", e))?;
        self.comm
            .all_reduce_in_place(&mut buffer, &ReduceOp::Sum)
            .map_err(|e| self.failed("ncclAllReduce", e))?;
        stream
            .memcpy_dtoh(&buffer, values)
            .map_err(|e| self.failed("copying the sum back", e))?;
        stream
            .synchronize()
            .map_err(|e| self.failed("waiting for the all-reduce", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On every GPU of the machine (`CUDA_VISIBLE_DEVICES` chooses): each rank's values summed
    /// on every rank. Run by hand on a GPU machine: `cargo test --features cuda --lib nccl --
    /// --ignored` (`bench/NOTES.md` has the results).
    #[test]
    #[ignore = "needs NVIDIA GPUs and libnccl.so.2"]
    fn every_gpu_gets_the_sum_of_every_ranks_values() {
        let count = CudaContext::device_count().expect("a CUDA driver") as usize;
        let gpus: Vec<usize> = (0..count).collect();
        let ends = Nccl::group(&gpus).unwrap();
        let world = ends.len();
        let n = 1 << 20;
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ends
                .into_iter()
                .map(|end| {
                    s.spawn(move || {
                        let mut values: Vec<f32> = (0..n)
                            .map(|i| (end.rank() + 1) as f32 * (i % 7) as f32)
                            .collect();
                        end.all_reduce_sum(&mut values).unwrap();
                        values
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ranks_sum = (world * (world + 1) / 2) as f32;
        for values in &results {
            assert!(
                values
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v == ranks_sum * (i % 7) as f32)
            );
        }
        println!("{world} GPUs: all-reduce of {n} f32 per rank summed on every rank");
    }
}
