//! Stage one: what admission cannot check (across fields, or needing the selector parsed);
//! an invalid spec stalls the app and harms nothing that runs.

use kube::ResourceExt;

use crate::api::GrayApp;
use crate::objects;
use crate::revision::Wanted;

/// The revisions a valid spec asks for, or why it is invalid.
pub fn validate(app: &GrayApp) -> Result<Wanted, String> {
    match objects::selector_matches_template(app) {
        Ok(true) => {}
        Ok(false) => return Err("spec.selector does not match the labels of spec.template".into()),
        Err(why) => return Err(format!("spec.selector: {why}")),
    }
    for (index, batch) in app.spec.update.batches.iter().enumerate() {
        if let Some(selector) = &batch.selector
            && let Err(why) = gantry_kit::selector::parse(selector)
        {
            return Err(format!("spec.update.batches[{index}].selector: {why}"));
        }
    }
    let no_containers = app
        .spec
        .template
        .spec
        .as_ref()
        .is_none_or(|s| s.containers.is_empty());
    if no_containers {
        return Err("spec.template has no containers".into());
    }
    Wanted::for_spec(&app.name_any(), &app.spec)
}
