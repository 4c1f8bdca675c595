//! Reductions across the units of one cube, through shared memory, for the kernels that give a
//! whole row to one cube (RMSNorm, the loss's log-sum-exp). The cube's width is
//! [`ROW_UNITS`], a power of two; every unit calls them together (they synchronise the cube).

use cubecl::prelude::*;

/// Units of a cube that reduces one row.
pub const ROW_UNITS: u32 = 256;

/// Rows of `n`: cube `CUBE_POS_X` takes rows `CUBE_POS_X`, `+ CUBE_COUNT_X`, ... (the count
/// stays within every API's limit of 65,535 cubes a dimension).
pub fn row_cubes(rows: usize) -> CubeCount {
    CubeCount::Static(rows.clamp(1, 65_535) as u32, 1, 1)
}

/// The sum of every unit's `value`.
#[cube]
pub fn cube_sum(value: f32, shared: &mut SharedMemory<f32>) -> f32 {
    cube_fold(value, shared, false)
}

/// The largest of every unit's `value`.
#[cube]
pub fn cube_max(value: f32, shared: &mut SharedMemory<f32>) -> f32 {
    cube_fold(value, shared, true)
}

/// Every unit's `value` folded by a tree over the cube's shared memory: summed, or the largest.
#[cube]
fn cube_fold(value: f32, shared: &mut SharedMemory<f32>, #[comptime] max: bool) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let other = shared[unit + stride];
            if max {
                if other > shared[unit] {
                    shared[unit] = other;
                }
            } else {
                shared[unit] += other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let folded = shared[0];
    // Every unit has read the result before the memory is written again.
    sync_cube();
    folded
}
