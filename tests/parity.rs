//! Fidelity against PyTorch: `eptc compile` + `eptc run` on the CPU backend reproduce the
//! logits and features timm gives with EPT applied as the official code does
//! (fixtures from `scripts/make_fixtures.py`), for every checkpoint layout, EPT mode and
//! depth, batch 1 and 3, and a non-default image size.

mod common;

use common::*;

#[test]
fn cat_deep() {
    suites::ept_case("cat", "deep", &target_flags());
}

#[test]
fn cat_shallow() {
    suites::ept_case("cat", "shallow", &target_flags());
}

#[test]
fn multi_cat_deep() {
    suites::ept_case("multi-cat", "deep", &target_flags());
}

#[test]
fn multi_cat_shallow() {
    suites::ept_case("multi-cat", "shallow", &target_flags());
}

#[test]
fn plain_model_with_checkpoint_head() {
    suites::plain_model_with_checkpoint_head(&target_flags());
}

#[test]
fn non_default_image_size() {
    suites::non_default_image_size(&target_flags());
}
