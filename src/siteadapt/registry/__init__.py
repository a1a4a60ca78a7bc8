"""The model registry, below the steps: each site's adapted models in the MLflow model registry, and the gate
that decides which version serves the site.

- :func:`register_model` logs an adapted model as an MLflow ``pyfunc`` model (a thin wrapper around the method's
  ``predict_subject``, with an input example and signature) into the model's training run, registers it as a new
  version of ``siteadapt-<task>-<site>``, tags it (method, variant, source and target site, sha256 of the sites' data,
  the method options, git commit, the gate measurements, the registrant's gate thresholds) and moves the alias
  ``candidate`` to it. Registering the same weights again re-uses their version (only the alias moves; the recorded
  thresholds can only get stricter).
- :func:`promote` moves the alias ``champion`` to the ``candidate`` version if every gate of the gate policy in force
  passes (see "Gate policy" below) and records the authenticated identity, when, why and which policy decided as
  tags, with a signed promotion record; a failed gate refuses the promotion (recorded as well) and is reported in
  the returned ``gates`` list.
- :func:`verify_champion` (``siteadapt promote --check``) tells whether the ``champion`` alias was put where it is
  by :func:`promote` (any MLflow client can move an alias; k8s/MLFLOW-AUTH.md puts the server behind authentication)
  under a policy no looser than the one in force now.
- :func:`set_policy` (``siteadapt policy set``) is the admin command that writes the gate policy of a registered
  model; :func:`policy_in_force` (``siteadapt policy show``) reads it.

Gate policy (issue 27). The thresholds a version is judged by never come from the version itself: whoever registers
chooses the ``gates.*`` tags recorded on it (their own params.yaml, a Kubeflow run's ``gate_thresholds``), so those
tags can only make a promotion harder. The policy in force (:func:`read_policy`) is

1. the registered model's admin policy, when one was set: registered-model tags ``policy.document`` (canonical JSON:
   model name, policy version, gates, who, when) and ``policy.digest`` / ``policy.digest_alg``, written by
   ``siteadapt policy set`` from the admin's params.yaml ``registry.gates``. The digest is an HMAC-SHA256 with
   ``$SITEADAPT_PROMOTION_KEY`` when set: a registrant without the key can change the tags but not make them verify.
   Without the key it is a plain SHA-256, a consistency check only. A document that does not verify, names another
   model, or is absent or older than the admin version named by the current (verified) champion's record (a deleted
   or copied-back tag) refuses the promotion (:class:`RegistryError`, exit 2);
2. else the deployment's ``registry.gates`` (the params.yaml of whoever runs ``promote``), source ``params.yaml``,
   with its digest. Without an admin policy nothing stops the promoter's own params.yaml from being loose: a
   deployment where registrants can also run ``promote`` (or submit Kubeflow runs, whose ``params_yaml`` and
   ``gate_thresholds`` they choose) needs an admin policy and the key.

At promotion a version whose recorded gates are looser than the admin policy in any gate is refused
(:class:`GateLoosenedError`, exit 5, naming the policy: source, version, digest prefix, and each looser gate; no
override: register it again under the policy's gates). The thresholds applied are per gate the stricter of the
policy and the promoter's ``registry.gates`` (:func:`effective_gates`), so the version's own gates never loosen
anything. Under the params.yaml policy the promoter's gates *are* the policy: a version recorded with looser ones is
simply judged by the policy's thresholds (a failing gate refuses it, exit 1, the refusal naming the policy), because
a promoter tightening their own params.yaml must not be reported as a loosening registrant. Applied thresholds
looser than the version's recorded ones are refused (exit 5) unless overridden with ``--override-gates --reason``
(recorded), which therefore never goes below the admin policy. The promotion record and the version tags
``promotion.policy.*`` name the policy that decided (source, version, digest); a refusal records it in
``promotion_refused_policy``.

Gates (measured and the registrant's thresholds recorded at registration; promotion applies the policy in force,
tightened by the promoter's ``registry.gates``):

- segmentation, a site with labeled test subjects: ``min_target_dice`` (mean Dice over structures and test
  subjects, from ``siteadapt evaluate``);
- segmentation, a site without them (and every site with ``label_free: always``): ``max_source_dice_drop`` (the
  adapted model must not forget the source site: Dice of the source segmenter on the source site's test subjects
  minus the adapted model's), ``max_empty_fraction`` and ``max_fragmented_fraction`` (plausibility of the predicted
  shapes on the site's test subjects, :mod:`siteadapt.metrics.plausibility`);
- classification, a site with labeled test images: ``min_target_auc`` (AUC on them, from ``siteadapt evaluate``);
- classification, a site without them (and with ``label_free: always``): ``max_source_auc_drop`` (AUC of the source
  classifier on the source site's labeled test images minus the adapted model's). Shape plausibility has no
  classification counterpart.

A gate whose threshold is null is off; a gate whose measurement is missing fails (value ``None``). The task's kind
is recorded on the version (tag ``kind``) and picks the gates at promotion.

The pyfunc model's input is preprocessed images (``siteadapt preprocess`` output: a subject's slices, or a batch of
2D images of a classification task), float32 ``(N, 1, H, W)`` in [-1, 1] (the signature enforces it). Its output:
segmentation, the label map ``(N, H, W)`` (uint8, the task's label ids; :class:`SiteadaptSegmenter`);
classification, P(positive class) per image ``(N,)`` (float32, the task's ``classes[1]``;
:class:`SiteadaptClassifier`). It is stored as code (``siteadapt/pyfunc_model.py`` / ``pyfunc_classifier.py``), not
as a pickle. Loading it needs the ``siteadapt`` package in the environment (it is listed in the model's
requirements). Input with NaN or +/-Inf anywhere is refused (:class:`NonFiniteInputError`, with the counts), never
mapped to a label map or a probability.

Modules, one job each: :mod:`.naming` (model names, aliases, tag values, lookup by alias), :mod:`.pyfunc` (the served
model), :mod:`.gates` (measurements and the gate check), :mod:`.policy` (recorded and admin gate policies, digests,
identity), :mod:`.register` (registration), :mod:`.promote` (promotion and its preview), :mod:`.verify` (champion
verification). Nothing here imports :mod:`siteadapt.steps`; the ``select`` and ``register`` steps call into it.
"""
