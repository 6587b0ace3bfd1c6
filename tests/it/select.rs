//! Selection math against hand computations and planted structure: regret and Spearman by hand,
//! the gain decomposition recovering planted effects from an incomplete table.

use recycle::select::correlate::{average_ranks, pearson, spearman};
use recycle::select::decompose::{decompose, DecomposeConfig, Interaction};
use recycle::select::holdout::leave_one_out;
use recycle::select::regret::{rank_by_proxy, regret, Proxy};
use recycle::select::rng::SplitMix64;
use recycle::select::GainTable;

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The hand-computed regret table:
///
/// ```text
///          t1    t2    t3    proxy   (ranking by proxy: A, C, B, D)
///   A     1.0  -0.5   2.0    0.9
///   B     3.0   0.0    —     0.5
///   C     2.0   1.5   0.5    0.7
///   D     0.5   2.5   1.0    0.1
/// ```
fn hand_table() -> (GainTable, Vec<Option<f64>>) {
    let gains = vec![
        vec![Some(1.0), Some(-0.5), Some(2.0)],
        vec![Some(3.0), Some(0.0), None],
        vec![Some(2.0), Some(1.5), Some(0.5)],
        vec![Some(0.5), Some(2.5), Some(1.0)],
    ];
    let std = vec![
        vec![Some(0.3), Some(0.3), Some(0.3)],
        vec![Some(0.3), Some(0.3), None],
        vec![Some(0.3), Some(0.3), Some(0.3)],
        vec![Some(0.3), Some(0.6), Some(0.3)],
    ];
    let table = GainTable::new(
        vec!["A".into(), "B".into(), "C".into(), "D".into()],
        vec!["t1".into(), "t2".into(), "t3".into()],
        gains,
    )
    .unwrap()
    .with_seed_std(std)
    .unwrap();
    (table, vec![Some(0.9), Some(0.5), Some(0.7), Some(0.1)])
}

#[test]
fn regret_equals_the_hand_computation() {
    let (table, proxy) = hand_table();
    assert_eq!(rank_by_proxy(&proxy), vec![0, 2, 1, 3]);

    // k = 1 selects A everywhere.
    // t1: best B 3.0 − A 1.0 = 2.0; t2: best D 2.5 − A (−0.5) = 3.0; t3: best A 2.0 − A 2.0 = 0.
    let r1 = regret(&table, Proxy::Global(&proxy), 1).unwrap();
    let got: Vec<f64> = r1.per_target.iter().map(|r| r.regret).collect();
    assert_eq!(got, vec![2.0, 3.0, 0.0]);
    assert!((r1.mean_regret.unwrap() - 5.0 / 3.0).abs() < 1e-12);
    assert_eq!(r1.max_regret, Some(3.0));
    assert_eq!(r1.per_target[0].best_model, "B");
    assert_eq!(r1.per_target[1].best_model, "D");
    assert_eq!(r1.per_target[2].candidates, 3); // B was not evaluated on t3

    // k = 2 selects A and C. t1: 3.0 − max(1.0, 2.0) = 1.0; t2: 2.5 − max(−0.5, 1.5) = 1.0; t3: 0.
    let r2 = regret(&table, Proxy::Global(&proxy), 2).unwrap();
    let got: Vec<f64> = r2.per_target.iter().map(|r| r.regret).collect();
    assert_eq!(got, vec![1.0, 1.0, 0.0]);
    assert!((r2.mean_regret.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(
        r2.per_target[0].selected,
        vec!["A".to_string(), "C".to_string()]
    );

    // k = 3: t1 top-3 = A, C, B → 0; t2 → 2.5 − 1.5 = 1.0; t3 (A, C, D) → 0.
    let r3 = regret(&table, Proxy::Global(&proxy), 3).unwrap();
    let got: Vec<f64> = r3.per_target.iter().map(|r| r.regret).collect();
    assert_eq!(got, vec![0.0, 1.0, 0.0]);

    // Noise floor: t2 averages (0.3 + 0.3 + 0.3 + 0.6) / 4 = 0.375; t1 and t3 are 0.3.
    assert!((r1.per_target[1].noise_floor.unwrap() - 0.375).abs() < 1e-12);
    assert!((r1.noise_floor.unwrap() - (0.3 + 0.375 + 0.3) / 3.0).abs() < 1e-12);

    // A per-target proxy that is the gain itself has zero regret; k = 0 is an error.
    let oracle: Vec<Vec<Option<f64>>> = table.gains.clone();
    let r = regret(&table, Proxy::PerTarget(&oracle), 1).unwrap();
    assert_eq!(r.max_regret, Some(0.0));
    assert!(regret(&table, Proxy::Global(&proxy), 0).is_err());
    assert!(regret(&table, Proxy::Global(&proxy[..2]), 1).is_err());
}

#[test]
fn regret_skips_targets_without_candidates() {
    let (table, _) = hand_table();
    // Only B has a score, and B was not evaluated on t3.
    let proxy = vec![None, Some(1.0), None, None];
    let r = regret(&table, Proxy::Global(&proxy), 1).unwrap();
    assert_eq!(r.skipped_targets, vec!["t3".to_string()]);
    assert_eq!(r.per_target.len(), 2);
    assert_eq!(r.per_target[0].regret, 0.0); // B is the only candidate
}

#[test]
fn spearman_with_ties_by_hand() {
    // x = 1, 2, 2, 3 → ranks 1, 2.5, 2.5, 4;  y = 1, 3, 2, 4 → ranks 1, 3, 2, 4. Both rank means 2.5.
    // Deviations: (−1.5, 0, 0, 1.5) and (−1.5, 0.5, −0.5, 1.5): Sxy = 4.5, Sxx = 4.5, Syy = 5.
    // ρ = 4.5 / √(4.5 · 5) = √0.9.
    let x = [1.0, 2.0, 2.0, 3.0];
    let y = [1.0, 3.0, 2.0, 4.0];
    assert_eq!(average_ranks(&x), vec![1.0, 2.5, 2.5, 4.0]);
    let rho = spearman(&x, &y).unwrap().unwrap();
    assert!((rho - 0.9f64.sqrt()).abs() < 1e-12, "{rho}");
    // Pearson by hand: x = 1, 2, 3; y = 1, 3, 2 → Sxy = 1, Sxx = Syy = 2 → r = 0.5.
    let r = pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0])
        .unwrap()
        .unwrap();
    assert!((r - 0.5).abs() < 1e-12, "{r}");
}

/// μ + a + b (+ u·v) + noise, with about 20 % of the cells removed.
struct Planted {
    table: GainTable,
    truth: Vec<Vec<f64>>,
    a: Vec<f64>,
    b: Vec<f64>,
    mu: f64,
}

fn planted(nm: usize, nt: usize, noise: f64, interaction: f64, seed: u64) -> Planted {
    let mut rng = SplitMix64::new(seed);
    let centre = |v: Vec<f64>| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        v.into_iter().map(|x| x - m).collect::<Vec<_>>()
    };
    let a = centre((0..nm).map(|_| 2.0 * rng.normal()).collect());
    let b = centre((0..nt).map(|_| 3.0 * rng.normal()).collect());
    let u = centre((0..nm).map(|_| rng.normal()).collect());
    let v = centre((0..nt).map(|_| rng.normal()).collect());
    let mu = 1.5;
    let truth: Vec<Vec<f64>> = (0..nm)
        .map(|m| {
            (0..nt)
                .map(|t| mu + a[m] + b[t] + interaction * u[m] * v[t])
                .collect()
        })
        .collect();
    let gains: Vec<Vec<Option<f64>>> = truth
        .iter()
        .map(|row| {
            row.iter()
                .map(|&g| (rng.uniform() >= 0.2).then(|| g + noise * rng.normal()))
                .collect()
        })
        .collect();
    let table = GainTable::new(names("m", nm), names("t", nt), gains).unwrap();
    Planted {
        table,
        truth,
        a,
        b,
        mu,
    }
}

#[test]
fn decomposition_recovers_planted_effects_with_missing_cells() {
    let p = planted(15, 10, 0.1, 0.0, 7);
    let missing = 150 - p.table.observed();
    assert!((20..=45).contains(&missing), "{missing} missing cells");
    let d = decompose(&p.table, &DecomposeConfig::default()).unwrap();
    assert!(d.converged);
    assert!(
        (d.mean.estimate - p.mu).abs() < 0.1,
        "μ {}",
        d.mean.estimate
    );
    for (e, a) in d.model_effects.iter().zip(&p.a) {
        assert!(
            (e.estimate - a).abs() < 0.1,
            "{}: {} vs {a}",
            e.name,
            e.estimate
        );
        let se = e.std_err.unwrap();
        assert!(se > 0.0 && se < 0.1, "{}: se {se}", e.name);
    }
    for (e, b) in d.target_effects.iter().zip(&p.b) {
        assert!(
            (e.estimate - b).abs() < 0.1,
            "{}: {} vs {b}",
            e.name,
            e.estimate
        );
    }
    assert_eq!(d.predictions.len(), missing);
    let mut covered = 0;
    for c in &d.predictions {
        let m: usize = c.model[1..].parse().unwrap();
        let t: usize = c.target[1..].parse().unwrap();
        let truth = p.truth[m][t];
        assert!(
            (c.estimate - truth).abs() < 0.2,
            "{}/{}: {} vs {truth}",
            c.model,
            c.target,
            c.estimate
        );
        if c.lower.unwrap() <= truth && truth <= c.upper.unwrap() {
            covered += 1;
        }
    }
    // 95 % intervals against the noiseless truth: nearly all should cover it.
    assert!(
        covered * 10 >= missing * 9,
        "{covered} of {missing} intervals cover the truth"
    );
    let sd = d.residual_std.unwrap();
    assert!(
        (0.05..0.2).contains(&sd),
        "residual std {sd} for planted noise 0.1"
    );
    // Nearly all variance is model + target; the residual share is small.
    let v = d.variance.as_ref().unwrap();
    assert!(v.residual < 0.01, "{v:?}");
    assert!((v.model + v.target + v.residual - 1.0).abs() < 0.05);
    // The bootstrap is seeded: the same seed gives the same errors.
    let again = decompose(&p.table, &DecomposeConfig::default()).unwrap();
    assert_eq!(again, d);
}

#[test]
fn variance_shares_add_up_in_a_complete_table() {
    let mut p = planted(6, 5, 0.5, 0.0, 3);
    for (row, truth) in p.table.gains.iter_mut().zip(&p.truth) {
        for (g, t) in row.iter_mut().zip(truth) {
            g.get_or_insert(*t);
        }
    }
    let d = decompose(
        &p.table,
        &DecomposeConfig {
            bootstrap: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let v = d.variance.as_ref().unwrap();
    assert!(
        (v.model + v.target + v.residual - 1.0).abs() < 1e-9,
        "{v:?}"
    );
    // In a complete table the effects are row and column means minus the grand mean.
    let grand: f64 = p
        .table
        .gains
        .iter()
        .flatten()
        .map(|g| g.unwrap())
        .sum::<f64>()
        / 30.0;
    let row0: f64 = p.table.gains[0].iter().map(|g| g.unwrap()).sum::<f64>() / 5.0;
    assert!((d.mean.estimate - grand).abs() < 1e-9);
    assert!((d.model_effects[0].estimate - (row0 - grand)).abs() < 1e-9);
    assert!(d.model_effects[0].std_err.is_none() && d.predictions.is_empty());
}

#[test]
fn rank_one_interaction_is_recovered() {
    let p = planted(12, 10, 0.05, 1.5, 21);
    let additive = decompose(
        &p.table,
        &DecomposeConfig {
            bootstrap: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let config = DecomposeConfig {
        interaction: Interaction::RankOne,
        bootstrap: 50,
        ..Default::default()
    };
    let d = decompose(&p.table, &config).unwrap();
    assert!(d.converged, "{} sweeps", d.iterations);
    let (sd1, sd0) = (d.residual_std.unwrap(), additive.residual_std.unwrap());
    assert!(
        sd1 < 0.1 && sd0 > 3.0 * sd1,
        "rank-one residual {sd1}, additive {sd0}"
    );
    assert!(d.variance.as_ref().unwrap().interaction.unwrap() > 0.02);
    for c in &d.predictions {
        let m: usize = c.model[1..].parse().unwrap();
        let t: usize = c.target[1..].parse().unwrap();
        assert!(
            (c.estimate - p.truth[m][t]).abs() < 0.25,
            "{}/{}",
            c.model,
            c.target
        );
    }
}

#[test]
fn decomposition_names_what_it_cannot_fit() {
    let table = GainTable::new(
        names("m", 2),
        names("t", 2),
        vec![vec![Some(1.0), Some(2.0)], vec![None, None]],
    )
    .unwrap();
    let err = decompose(&table, &DecomposeConfig::default()).unwrap_err();
    assert!(format!("{err:#}").contains("m1"), "{err:#}");
    assert!(GainTable::new(
        names("m", 1),
        names("t", 2),
        vec![vec![Some(f64::NAN), None]]
    )
    .is_err());
    assert!(GainTable::new(
        vec!["x".into(), "x".into()],
        names("t", 1),
        vec![vec![None], vec![None]]
    )
    .is_err());
}

#[test]
fn variance_shares_need_two_models_two_targets_and_some_spread() {
    let config = DecomposeConfig {
        bootstrap: 20,
        ..Default::default()
    };
    let table = |rows: &[&[f64]]| {
        let gains = rows
            .iter()
            .map(|r| r.iter().map(|&g| Some(g)).collect())
            .collect();
        GainTable::new(names("m", rows.len()), names("t", rows[0].len()), gains).unwrap()
    };
    let notes = |rows: &[&[f64]]| {
        let d = decompose(&table(rows), &config).unwrap();
        assert_eq!(d.variance.is_none(), !d.notes.is_empty(), "{d:?}");
        d.notes
    };
    let split = |m: usize, t: usize| {
        format!(
            "variance shares: the model/target effect split needs at least 2 models and 2 \
             targets; have {m} × {t}"
        )
    };
    let no_dof = |n: usize, p: usize| {
        format!(
            "standard errors, residual std and prediction intervals: they need more evaluated \
             cells than fitted parameters; have {n} cell{} for {p} parameter{}",
            if n == 1 { "" } else { "s" },
            if p == 1 { "" } else { "s" }
        )
    };
    assert_eq!(notes(&[&[1.0]]), [split(1, 1), no_dof(1, 1)]);
    assert_eq!(notes(&[&[1.0, 2.0, 4.0]]), [split(1, 3), no_dof(3, 3)]);
    assert_eq!(notes(&[&[1.0], &[2.0]]), [split(2, 1), no_dof(2, 2)]);
    assert_eq!(
        notes(&[&[1.5, 1.5], &[1.5, 1.5]]),
        ["variance shares: every evaluated gain is the same, so there is no variance to split"]
    );
    // 2 × 2 with spread: shares, and one degree of freedom for the standard errors.
    assert!(notes(&[&[1.0, 2.0], &[3.0, 5.0]]).is_empty());
    // Without a bootstrap nothing was asked of the degrees of freedom.
    let d = decompose(
        &table(&[&[1.0]]),
        &DecomposeConfig {
            bootstrap: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(d.notes, [split(1, 1)]);
}

#[test]
fn disconnected_groups_are_neither_split_nor_predicted_across() {
    // m0, m1 were evaluated on t0, t1 only; m2 on t2 only: two groups that share no target, whose
    // relative level no cell measures.
    let table = GainTable::new(
        names("m", 3),
        names("t", 3),
        vec![
            vec![Some(1.0), Some(2.0), None],
            vec![Some(3.0), Some(4.5), None],
            vec![None, None, Some(7.0)],
        ],
    )
    .unwrap();
    let d = decompose(
        &table,
        &DecomposeConfig {
            bootstrap: 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(d.variance.is_none(), "{d:?}");
    assert!(
        d.notes[0].contains("2 groups") && d.notes[0].contains("[m0, m1] [m2]"),
        "{:?}",
        d.notes
    );
    // Only the cells within a group are predicted: none here (each group is complete).
    assert!(d.predictions.is_empty(), "{:?}", d.predictions);
    // 5 cells, 3 + 3 − 2 parameters.
    assert_eq!(d.dof, 1);
    // Within the first group the fit is the additive one: m1 − m0 = 2.25.
    let gap = d.model_average(1) - d.model_average(0);
    assert!((gap - 2.25).abs() < 1e-6, "{gap}");

    // Linking the groups with one cell restores the split, and predicts every missing cell.
    let mut linked = table.gains.clone();
    linked[0][2] = Some(5.0);
    let table = GainTable::new(names("m", 3), names("t", 3), linked).unwrap();
    let d = decompose(&table, &DecomposeConfig::default()).unwrap();
    assert!(d.variance.is_some() && d.notes.is_empty(), "{d:?}");
    assert_eq!(d.predictions.len(), 3);
    assert_eq!(d.dof, 6 - 5);
    // Hiding that one link disconnects the groups again: leave-one-out skips it, as it skips a
    // model's or target's only cell, and checks the rest.
    let h = leave_one_out(&table, &DecomposeConfig::default()).unwrap();
    assert_eq!(h.skipped, ["m0 / t2", "m2 / t2"]);
    assert_eq!(h.cells.len(), 4);
}

#[test]
fn analysis_report_combines_decomposition_correlation_and_regret() {
    use recycle::select::analyze::{report, to_markdown, AnalysisReport};
    use std::collections::BTreeMap;
    // A complete 4 × 3 table: the adjusted averages are the row means 1.0, 2.0, 3.0, 0.5.
    let rows = [
        [0.0, 1.0, 2.0],
        [2.0, 2.5, 1.5],
        [3.0, 3.0, 3.0],
        [1.0, 0.0, 0.5],
    ];
    let gains: Vec<Vec<Option<f64>>> = rows
        .iter()
        .map(|r| r.iter().map(|&g| Some(g)).collect())
        .collect();
    let table = GainTable::new(names("m", 4), names("t", 3), gains).unwrap();
    let mut proxies = BTreeMap::new();
    // Monotone in the row means (Spearman 1) but not linear.
    let monotone: BTreeMap<String, f64> = [
        ("m0", 1.0),
        ("m1", 4.0),
        ("m2", 9.0),
        ("m3", 0.0),
        ("stranger", 5.0),
    ]
    .iter()
    .map(|(m, s)| (m.to_string(), *s))
    .collect();
    proxies.insert("lp".to_string(), monotone);
    let r = report(&table, &proxies).unwrap();
    assert_eq!(r.averages[0].model, "m2");
    assert!((r.averages[0].adjusted - 3.0).abs() < 1e-9);
    assert_eq!(r.averages[0].observed, Some(3.0));
    let p = &r.proxies[0];
    assert_eq!(p.scored_models, 4);
    assert_eq!(p.unknown_models, vec!["stranger".to_string()]);
    assert!((p.spearman.unwrap() - 1.0).abs() < 1e-12);
    assert!(p.pearson.unwrap() < 1.0 - 1e-6 && p.pearson.unwrap() > 0.9);
    // Top-1 is m2 everywhere: t0 best m2 (3.0) → 0; t1 best m2 → 0; t2 best m2 → 0.
    assert_eq!(p.regret[0].k, 1);
    assert_eq!(p.regret[0].mean_regret, Some(0.0));
    let md = to_markdown(&r);
    for needle in [
        "# Gain analysis",
        "| model effect |",
        "| m2 | 3.00 |",
        "| lp | 4 | ",
        "regret top-3",
    ] {
        assert!(md.contains(needle), "markdown lacks {needle:?}:\n{md}");
    }
    let json = serde_json::to_string(&r).unwrap();
    let back: AnalysisReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.averages, r.averages);
}

#[test]
fn analyze_flags_parse_into_typed_settings() {
    use clap::Parser;
    use recycle::cli::{Cli, Command};
    let cli = Cli::try_parse_from([
        "recycle",
        "analyze",
        "--arch",
        "roberta-base",
        "--proxy",
        "mnli_lp=lp.json",
        "--k",
        "1,5",
        "--interaction",
        "rank-one",
        "--seed",
        "3",
    ])
    .unwrap();
    let Command::Analyze(args) = cli.command else {
        panic!("not analyze")
    };
    assert_eq!(
        args.proxies,
        vec![("mnli_lp".to_string(), "lp.json".into())]
    );
    let config = args.analysis_config().unwrap();
    assert_eq!(config.ks, vec![1, 5]);
    assert_eq!(config.decompose.interaction, Interaction::RankOne);
    assert_eq!(config.decompose.seed, 3);
    assert!(
        Cli::try_parse_from(["recycle", "analyze", "--arch", "x", "--proxy", "nofile"]).is_err()
    );
    let cli = Cli::try_parse_from(["recycle", "analyze", "--arch", "x", "--k", "0"]).unwrap();
    let Command::Analyze(args) = cli.command else {
        panic!("not analyze")
    };
    assert!(args.analysis_config().is_err());
}

/// LogME and H-score against values computed independently with numpy's SVD and pinv
/// (tests/fixtures/select/make_reference.py).
#[test]
fn logme_and_hscore_match_the_numpy_reference() {
    use recycle::select::hscore::{hscore, CovInverse};
    use recycle::select::logme::{logme, logme_regression};
    use recycle::select::Matrix;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/select/reference.json"
    );
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(reference["features"].clone()).unwrap();
    let labels: Vec<usize> = serde_json::from_value(reference["labels"].clone()).unwrap();
    let target: Vec<f64> = serde_json::from_value(reference["regression_target"].clone()).unwrap();
    let classes = reference["num_classes"].as_u64().unwrap() as usize;
    let f = Matrix::from_rows(&rows).unwrap();
    let want = |k: &str| reference[k].as_f64().unwrap();
    let got = logme(&f, &labels, classes).unwrap();
    assert!(
        (got - want("logme")).abs() < 1e-6,
        "LogME {got} vs numpy {}",
        want("logme")
    );
    let got = logme_regression(&f, &target).unwrap();
    assert!(
        (got - want("logme_regression")).abs() < 1e-6,
        "LogME regression {got} vs {}",
        want("logme_regression")
    );
    let got = hscore(&f, &labels, classes, CovInverse::default()).unwrap();
    assert!(
        (got - want("hscore")).abs() < 1e-9,
        "H-score {got} vs numpy {}",
        want("hscore")
    );
}

#[test]
fn gain_table_from_a_leaderboard() {
    use recycle::leaderboard::*;
    use recycle::select::analyze::from_leaderboard;
    use std::collections::BTreeMap;
    let done = |gain: f64| Cell::Done {
        score: 80.0 + gain,
        gain,
        seeds: 3,
        within_noise: false,
    };
    let row = |id: &str, cells: Vec<Cell>, lp: Option<f64>| Row {
        rank: None,
        model: ModelInfo {
            id: id.into(),
            revision: None,
            label: None,
        },
        cells,
        avg_gain: None,
        partial_avg_gain: None,
        coverage: Coverage { done: 0, total: 2 },
        proxies: lp
            .map(|v| BTreeMap::from([("mnli_lp".to_string(), v)]))
            .unwrap_or_default(),
    };
    let base = |std: Option<f64>| BaselineCell {
        mean: Some(80.0),
        std,
        scores: vec![80.0],
        failed: 0,
    };
    let board = Leaderboard {
        schema_version: LEADERBOARD_SCHEMA_VERSION,
        arch: "roberta-base".into(),
        targets: vec![
            TargetInfo {
                name: "sst2".into(),
                metric: Metric::Accuracy,
            },
            TargetInfo {
                name: "stsb".into(),
                metric: Metric::Spearman,
            },
        ],
        baseline: BaselineRow {
            model: ModelInfo {
                id: "roberta-base".into(),
                revision: None,
                label: None,
            },
            cells: vec![base(Some(0.4)), base(None)],
            avg_score: Some(80.0),
        },
        rows: vec![
            row("a", vec![done(1.5), Cell::Missing], Some(70.0)),
            row(
                "b",
                vec![
                    Cell::Failed {
                        error: "oom".into(),
                    },
                    done(-0.5),
                ],
                None,
            ),
        ],
        provenance: Provenance {
            recycle_version: "0".into(),
            generated_at: "2026-01-01T00:00:00Z".into(),
            suites: vec![],
            protocol_hashes: vec![],
            results: 4,
        },
    };
    let (table, proxies) = from_leaderboard(&board).unwrap();
    assert_eq!(table.models, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(table.targets, vec!["sst2".to_string(), "stsb".to_string()]);
    assert_eq!(
        table.gains,
        vec![vec![Some(1.5), None], vec![None, Some(-0.5)]]
    );
    assert_eq!(table.std(0, 0), Some(0.4));
    assert_eq!(table.std(1, 1), None);
    assert_eq!(
        proxies["mnli_lp"],
        BTreeMap::from([("a".to_string(), 70.0)])
    );
}

mod wiring;
