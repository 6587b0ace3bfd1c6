//! Structural checks of configs/ibm36.json (plain JSON until the suite format lands).
