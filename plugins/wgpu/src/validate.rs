//! naga validation of generated WGSL: the module must parse, validate (all validation
//! flags, default capabilities plus `SHADER_FLOAT16` for f16 storage), have the kernel's
//! entry point as a compute shader, and follow the binding convention of [`Kernel`]:
//! group 0, bindings `0..inputs` read-only storage `array<f32>` (`array<f16>` for f16
//! storage), binding `inputs` the read-write output, every one of them used by the entry
//! point; the dispatch at most 65535 workgroups per dimension.

use eptc_ir::DType;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::{AddressSpace, StorageAccess, TypeInner};

use crate::codegen::wgsl::MAX_GROUPS;
use crate::codegen::{Kernel, Storage};

/// Parse and validate a kernel's WGSL (f32 storage) with naga; the error names the kernel
/// and quotes naga's message.
pub fn validate(k: &Kernel) -> Result<(), String> {
    validate_storage(k, DType::F32)
}

/// [`validate`] for tensors stored as `dtype`: with f16 the validator allows WGSL's `f16`
/// type and every binding must be an `array<f16>`.
pub fn validate_storage(k: &Kernel, dtype: DType) -> Result<(), String> {
    let st = Storage::of(dtype).map_err(|e| format!("kernel {}: {e}", k.name))?;
    let (caps, scalar) = match st {
        Storage::F32 => (Capabilities::default(), naga::Scalar::F32),
        Storage::F16 => (
            Capabilities::default() | Capabilities::SHADER_FLOAT16,
            naga::Scalar::F16,
        ),
    };
    let module = naga::front::wgsl::parse_str(&k.source).map_err(|e| {
        format!(
            "kernel {}: WGSL does not parse:\n{}",
            k.name,
            e.emit_to_string(&k.source)
        )
    })?;
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| {
            format!(
                "kernel {}: WGSL does not validate:\n{}",
                k.name,
                e.emit_to_string(&k.source)
            )
        })?;
    let fail = |msg: String| Err(format!("kernel {}: {msg}", k.name));
    let Some(ep_index) = module.entry_points.iter().position(|e| e.name == k.entry) else {
        return fail(format!("no entry point `{}`", k.entry));
    };
    if module.entry_points[ep_index].stage != naga::ShaderStage::Compute {
        return fail(format!("entry point `{}` is not a compute shader", k.entry));
    }
    if k.workgroups.iter().any(|&w| w as usize > MAX_GROUPS) {
        return fail(format!(
            "dispatch {:?} exceeds {MAX_GROUPS} workgroups in a dimension",
            k.workgroups
        ));
    }
    let ep_info = info.get_entry_point(ep_index);
    let mut seen = vec![false; k.inputs + 1];
    for (handle, var) in module.global_variables.iter() {
        let AddressSpace::Storage { access } = var.space else {
            if matches!(var.space, AddressSpace::Uniform | AddressSpace::Handle) {
                return fail(format!(
                    "global `{}` is not a storage buffer (no uniforms, textures or samplers)",
                    var.name.as_deref().unwrap_or("?")
                ));
            }
            continue;
        };
        let name = var.name.as_deref().unwrap_or("?");
        let Some(rb) = &var.binding else {
            return fail(format!("storage buffer `{name}` has no binding"));
        };
        let b = rb.binding as usize;
        if rb.group != 0 || b > k.inputs {
            return fail(format!(
                "`{name}` is at group {} binding {}: operands use group 0, bindings 0..={}",
                rb.group, rb.binding, k.inputs
            ));
        }
        if std::mem::replace(&mut seen[b], true) {
            return fail(format!("binding {b} is declared twice"));
        }
        let typed_array = match &module.types[var.ty].inner {
            TypeInner::Array { base, .. } => module.types[*base].inner == TypeInner::Scalar(scalar),
            _ => false,
        };
        if !typed_array {
            return fail(format!(
                "`{name}` (binding {b}) is not an array<{}>",
                st.scalar()
            ));
        }
        let writable = access.contains(StorageAccess::STORE);
        if writable != (b == k.inputs) {
            return fail(format!(
                "`{name}` (binding {b}) must be {}",
                if b == k.inputs {
                    "the read_write output"
                } else {
                    "read-only (an operand)"
                }
            ));
        }
        if ep_info[handle].is_empty() {
            return fail(format!(
                "binding {b} (`{name}`) is not used by the entry point"
            ));
        }
    }
    if let Some(b) = seen.iter().position(|s| !s) {
        return fail(format!(
            "binding {b} is missing ({} operands + the output)",
            k.inputs
        ));
    }
    Ok(())
}
