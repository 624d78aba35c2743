//! `lps analyze`: placeholder module, filled in by the analysis work.
