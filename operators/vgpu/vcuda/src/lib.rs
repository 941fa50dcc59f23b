//! Placeholder: the vCUDA interception library lands here.
