//! The world-size-1 communicator: every collective is the identity.

use super::{CollectiveError, Communicator};

#[derive(Debug, Default)]
pub struct LocalCommunicator;

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buffer: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&mut self, _buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(CollectiveError::Invalid(format!("broadcast root {root} in a world of 1")));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
