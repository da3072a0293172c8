//! The ztunnel node agent.
