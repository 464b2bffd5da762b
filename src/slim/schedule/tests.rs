use super::*;

/// The defaults at keep ratio 0.5, where the presets reproduce the paper's counts.
fn cfg() -> SlimConfig {
    SlimConfig {
        keep_ratio: 0.5,
        ..SlimConfig::default()
    }
}

fn blocks(stages: &[Stage]) -> Vec<usize> {
    stages.iter().map(|s| s.keep_blocks).collect()
}

fn layers(stages: &[Stage]) -> Vec<usize> {
    stages.iter().map(|s| s.start_layer).collect()
}

fn err(c: &SlimConfig, n_layers: usize) -> String {
    c.validate(n_layers).expect_err("config should be rejected")
}

#[test]
fn defaults_are_valid_for_common_depths() {
    for n in [1, 2, 3, 6, 12, 24, 28, 30, 32, 40, 80] {
        cfg()
            .validate(n)
            .unwrap_or_else(|e| panic!("{n} layers: {e}"));
    }
}

#[test]
fn example_toml_parses_to_the_defaults() {
    #[derive(Deserialize)]
    struct Doc {
        slim: SlimConfig,
    }
    let doc: Doc = toml::from_str(EXAMPLE_TOML).unwrap();
    assert_eq!(doc.slim, SlimConfig::default());
}

#[test]
fn custom_stages_parse_from_toml() {
    let c: SlimConfig = toml::from_str(
        "preset = \"custom\"\nstages = [{ layer = 4, fraction = 0.5 }, { layer = 8, fraction = 0.25 }]",
    )
    .unwrap();
    assert_eq!(
        c.stages,
        vec![
            StageConfig {
                layer: 4,
                fraction: 0.5,
                floor: 0,
            },
            StageConfig {
                layer: 8,
                fraction: 0.25,
                floor: 0,
            }
        ]
    );
    c.validate(12).unwrap();
    assert!(
        toml::from_str::<SlimConfig>("keep_ratoi = 0.5").is_err(),
        "unknown keys are rejected"
    );
}

#[test]
fn keep_ratio_out_of_range_names_the_key() {
    for bad in [0.0, -0.1, 1.5, f32::NAN] {
        let e = err(
            &SlimConfig {
                keep_ratio: bad,
                ..cfg()
            },
            30,
        );
        assert!(e.contains("[slim] keep_ratio must be in (0, 1]"), "{e}");
    }
    assert_eq!(
        err(
            &SlimConfig {
                keep_ratio: 1.5,
                ..cfg()
            },
            30
        ),
        "[slim] keep_ratio must be in (0, 1], got 1.5"
    );
    SlimConfig {
        keep_ratio: 1.0,
        ..cfg()
    }
    .validate(30)
    .unwrap();
}

#[test]
fn unknown_preset_names_the_key() {
    let e = err(
        &SlimConfig {
            preset: "llama".into(),
            ..cfg()
        },
        30,
    );
    assert!(
        e.starts_with("[slim] preset must be one of") && e.contains("\"llama\""),
        "{e}"
    );
}

#[test]
fn stages_require_the_custom_preset_and_vice_versa() {
    let e = err(
        &SlimConfig {
            stages: vec![StageConfig {
                layer: 5,
                fraction: 0.5,
                floor: 0,
            }],
            ..cfg()
        },
        30,
    );
    assert!(e.starts_with("[slim] stages"), "{e}");
    let e = err(
        &SlimConfig {
            preset: "custom".into(),
            ..cfg()
        },
        30,
    );
    assert!(e.starts_with("[slim] stages"), "{e}");
}

#[test]
fn preset_layers_out_of_range_name_the_preset() {
    // llama3.1-8b prunes at layer 30, which a 30-layer model does not have.
    let e = err(
        &SlimConfig {
            preset: "llama3.1-8b".into(),
            ..cfg()
        },
        30,
    );
    assert!(
        e.contains("[slim] preset \"llama3.1-8b\"")
            && e.contains("must be in 1..30")
            && e.contains("got 30"),
        "{e}"
    );
}

#[test]
fn custom_layers_out_of_range_name_the_stage() {
    let custom = |stages: Vec<(usize, f32)>| SlimConfig {
        preset: "custom".into(),
        stages: stages
            .into_iter()
            .map(|(layer, fraction)| StageConfig {
                layer,
                fraction,
                floor: 0,
            })
            .collect(),
        ..cfg()
    };
    let e = err(&custom(vec![(0, 0.5)]), 30);
    assert!(
        e.starts_with("[slim] stages[0].layer must be in 1..30"),
        "{e}"
    );
    let e = err(&custom(vec![(10, 0.5), (30, 0.25)]), 30);
    assert!(
        e.starts_with("[slim] stages[1].layer must be in 1..30"),
        "{e}"
    );
    let e = err(&custom(vec![(10, 0.5), (10, 0.25)]), 30);
    assert!(
        e.starts_with("[slim] stages[1].layer must be greater"),
        "{e}"
    );
    let e = err(&custom(vec![(20, 0.5), (10, 0.25)]), 30);
    assert!(
        e.starts_with("[slim] stages[1].layer must be greater"),
        "{e}"
    );
    let e = err(&custom(vec![(10, 0.25), (20, 0.5)]), 30);
    assert!(
        e.starts_with("[slim] stages[1].fraction must not grow"),
        "{e}"
    );
    for bad in [0.0, 1.5, -1.0, f32::NAN] {
        let e = err(&custom(vec![(10, bad)]), 30);
        assert!(
            e.starts_with("[slim] stages[0].fraction must be in (0, 1]"),
            "{e}"
        );
    }
    custom(vec![(10, 1.0), (20, 1.0), (29, 0.1)])
        .validate(30)
        .unwrap();
}

#[test]
fn block_and_unit_sizes_must_nest() {
    let e = err(
        &SlimConfig {
            block_size: 60,
            ..cfg()
        },
        30,
    );
    assert_eq!(
        e,
        "[slim] block_size must be a positive multiple of unit_size (8), got 60"
    );
    let e = err(
        &SlimConfig {
            block_size: 0,
            ..cfg()
        },
        30,
    );
    assert!(e.starts_with("[slim] block_size"), "{e}");
    let e = err(
        &SlimConfig {
            unit_size: 0,
            ..cfg()
        },
        30,
    );
    assert!(e.starts_with("[slim] unit_size"), "{e}");
    for prefill_unit_size in [0, 3] {
        let e = err(
            &SlimConfig {
                prefill_unit_size,
                ..cfg()
            },
            30,
        );
        assert_eq!(
            e,
            format!(
                "[slim] prefill_unit_size must be at least 1 and divide block_size (64), got {prefill_unit_size}"
            )
        );
    }
    SlimConfig {
        block_size: 16,
        unit_size: 16,
        ..cfg()
    }
    .validate(30)
    .unwrap();
}

#[test]
fn local_window_and_gamma_are_checked() {
    let e = err(
        &SlimConfig {
            local_window: 0,
            ..cfg()
        },
        30,
    );
    assert!(e.starts_with("[slim] local_window"), "{e}");
    for bad in [-0.1, 1.1, f32::NAN] {
        let e = err(
            &SlimConfig {
                gamma: bad,
                ..cfg()
            },
            30,
        );
        assert!(e.starts_with("[slim] gamma must be in [0, 1]"), "{e}");
    }
    SlimConfig {
        gamma: 0.0,
        ..cfg()
    }
    .validate(30)
    .unwrap();
    SlimConfig {
        gamma: 1.0,
        ..cfg()
    }
    .validate(30)
    .unwrap();
}

#[test]
fn auto_preset_follows_the_layer_count() {
    let c = cfg();
    assert_eq!(c.preset_for(30), "smollm2");
    assert_eq!(c.preset_for(32), "llama3.1-8b");
    assert_eq!(c.preset_for(28), "qwen2.5-7b");
    assert_eq!(c.preset_for(24), "generic");
    assert_eq!(
        c.stage_fractions(30),
        vec![(10, 1.0), (15, 1.0), (20, 0.5), (28, 0.25)]
    );
    assert_eq!(
        c.stage_fractions(32),
        vec![(10, 0.5), (20, 0.25), (30, 0.125)]
    );
    assert_eq!(
        c.stage_fractions(28),
        vec![(9, 0.75), (18, 0.375), (26, 0.25)]
    );
}

#[test]
fn generic_preset_scales_with_depth_and_stays_increasing() {
    let c = SlimConfig {
        preset: "generic".into(),
        ..cfg()
    };
    assert_eq!(
        c.stage_fractions(30),
        vec![(10, 1.0), (20, 0.5), (28, 0.25)]
    );
    assert_eq!(c.stage_fractions(24), vec![(8, 1.0), (16, 0.5), (22, 0.25)]);
    assert_eq!(c.stage_fractions(16), vec![(5, 1.0), (11, 0.5), (14, 0.25)]);
    assert_eq!(c.stage_fractions(6), vec![(2, 1.0), (4, 0.5)]);
    assert_eq!(c.stage_fractions(2), vec![(1, 1.0)]);
    assert!(c.stage_fractions(1).is_empty());
    for n in 1..100 {
        c.validate(n).unwrap_or_else(|e| panic!("{n} layers: {e}"));
    }
}

#[test]
fn smollm2_at_8192_tokens_keeps_64_32_16_blocks() {
    let s = cfg().resolve(30, 8192);
    assert_eq!(layers(&s), vec![10, 20, 28]);
    assert_eq!(blocks(&s), vec![64, 32, 16]);
}

#[test]
fn smollm2s_stage_at_15_drops_rows_only_where_the_first_floor_binds() {
    // 4096 tokens: 3072 through layers 10-14 (the floor over the ratio's 2048), 2048 at 15-19
    let s = cfg().resolve(30, 4096);
    assert_eq!(layers(&s), vec![10, 15, 20, 28]);
    assert_eq!(blocks(&s), vec![48, 32, 16, 8]);
    // 5,000 tokens: layer 10's floor binds (48 blocks), layer 15 keeps the ratio's 2,500
    assert_eq!(blocks(&cfg().resolve(30, 5000)), vec![48, 40, 20, 10]);
    // from 6,144 tokens the ratio's budget at 10 is layer 15's too: no stage at 15, and the
    // stages are the three of 8192 tokens above
    assert_eq!(layers(&cfg().resolve(30, 6144)), vec![10, 20, 28]);
}

#[test]
fn llama_at_32k_matches_the_paper_token_counts() {
    let s = cfg().resolve(32, 32768);
    assert_eq!(layers(&s), vec![10, 20, 30]);
    // 8192, 4096, 2048 tokens.
    assert_eq!(blocks(&s), vec![128, 64, 32]);
}

#[test]
fn qwen_at_32k_matches_the_paper_token_counts() {
    let s = cfg().resolve(28, 32768);
    assert_eq!(layers(&s), vec![9, 18, 26]);
    // 12288, 6144, 4096 tokens.
    assert_eq!(blocks(&s), vec![192, 96, 64]);
}

#[test]
fn keep_ratio_scales_the_budgets() {
    let s = SlimConfig {
        keep_ratio: 1.0,
        ..cfg()
    }
    .resolve(30, 8192);
    assert_eq!(
        blocks(&s),
        vec![128, 64, 32],
        "fraction 1.0 at ratio 1.0 is a no-op stage"
    );
    let s = SlimConfig {
        keep_ratio: 0.75,
        ..cfg()
    }
    .resolve(30, 8192);
    assert_eq!(blocks(&s), vec![96, 48, 24]);
    // at 0.25 the preset's floors (3072/2048/1024/512 tokens) hold every stage, the one at
    // layer 15 too (at the ratios above, its fraction's budget was layer 10's: left out)
    let s = SlimConfig {
        keep_ratio: 0.25,
        ..cfg()
    }
    .resolve(30, 8192);
    assert_eq!(layers(&s), vec![10, 15, 20, 28]);
    assert_eq!(blocks(&s), vec![48, 32, 16, 8]);
}

#[test]
fn whole_block_budgets_do_not_round_up_from_f32_noise() {
    // 0.1 (f32) * 6400 is 640.0000095 in f64: exactly 10 blocks, not 11.
    let c = SlimConfig {
        keep_ratio: 0.1,
        min_keep_tokens: 0,
        ..generic()
    };
    assert_eq!(blocks(&c.resolve(30, 6400)), vec![10, 5, 3]);
}

#[test]
fn budgets_round_up_to_whole_blocks() {
    // 0.5 * 1000 = 500 tokens -> 8 blocks (of 16); 250 -> floor 256 -> 4; 125 -> 256 -> 4.
    let s = generic().resolve(30, 1000);
    assert_eq!(blocks(&s), vec![8, 4, 4]);
}

#[test]
fn floor_applies_for_short_prompts() {
    // 1024 tokens = 16 blocks; 512 -> 8 blocks, 256 -> 4, 128 -> floor 256 -> 4.
    assert_eq!(blocks(&generic().resolve(30, 1024)), vec![8, 4, 4]);
    // 300 tokens = 5 blocks: every budget is the 256-token floor = 4 blocks.
    assert_eq!(blocks(&generic().resolve(30, 300)), vec![4, 4, 4]);
    // 200 tokens = 4 blocks: the floor keeps everything, and the stages are no-ops.
    assert_eq!(blocks(&generic().resolve(30, 200)), vec![4, 4, 4]);
}

/// The same stages as smollm2 for 30 layers, without its floors.
fn generic() -> SlimConfig {
    SlimConfig {
        preset: "generic".into(),
        ..cfg()
    }
}

#[test]
fn a_stage_that_would_drop_a_sliver_keeps_every_block() {
    let c = SlimConfig::default();
    // smollm2, 3,136 tokens: layer 10's floor (48 blocks) would drop 1 of 49
    assert_eq!(blocks(&c.resolve(30, 3136)), vec![49, 32, 16, 8]);
    // 6 of 54 (11%) is still a sliver
    assert_eq!(blocks(&c.resolve(30, 54 * 64)), vec![54, 32, 16, 8]);
    // 7 of 55 is not
    assert_eq!(blocks(&c.resolve(30, 55 * 64)), vec![48, 32, 16, 8]);
    // far over the floors nothing changes
    assert_eq!(blocks(&c.resolve(30, 8192)), vec![64, 32, 16]);
    // a budget the ratio sets stays, however little it drops: 0.9 of 8192 tokens at layer 10
    let high = SlimConfig {
        keep_ratio: 0.9,
        ..SlimConfig::default()
    };
    assert_eq!(blocks(&high.resolve(30, 8192))[0], 116);
}

#[test]
fn a_schedule_that_would_spare_few_rows_keeps_every_block() {
    let c = SlimConfig::default();
    // smollm2's stages and floors as custom stages (smollm2 itself runs these prompts dense:
    // SMOLLM2_DENSE_TOKENS)
    let floors = SlimConfig {
        preset: "custom".into(),
        stages: [(10, 1.0, 3072), (20, 0.5, 1024), (28, 0.25, 512)]
            .map(|(layer, fraction, floor)| StageConfig {
                layer,
                fraction,
                floor,
            })
            .to_vec(),
        ..cfg()
    };
    // 18 blocks: layer 20's floor (16 blocks) would drop a sliver and keeps it; layer 28 alone
    // would drop 10: 2 x 10 of 30 x 18 block-layers (3.7%) spared, so it keeps them too, and
    // nothing is pruned: no schedule
    assert!(floors.resolve(30, 18 * 64).is_empty());
    // 1,000 tokens: only layer 28 would drop blocks (8 of 16 at two layers, 3.3%)
    assert!(floors.resolve(30, 1000).is_empty());
    // at 19 blocks layer 20 drops 3 at 8 layers too, 8% of the rows, and the stages prune
    assert_eq!(blocks(&floors.resolve(30, 19 * 64)), vec![19, 16, 8]);
    // smollm2: dense up to 36 blocks, then its floors
    assert!(c.resolve(30, 19 * 64).is_empty());
    assert!(c.resolve(30, 36 * 64).is_empty());
    assert_eq!(blocks(&c.resolve(30, 37 * 64)), vec![37, 32, 16, 8]);
    assert_eq!(blocks(&c.resolve(30, 4096)), vec![48, 32, 16, 8]);
    // a budget the ratio sets stays: custom stages without floors at layers 28 and 29
    let custom = SlimConfig {
        preset: "custom".into(),
        stages: vec![
            StageConfig {
                layer: 28,
                fraction: 1.0,
                floor: 0,
            },
            StageConfig {
                layer: 29,
                fraction: 0.5,
                floor: 0,
            },
        ],
        ..SlimConfig::default()
    };
    assert_eq!(blocks(&custom.resolve(30, 2112)), vec![17, 9]);
    // stages held at their floors (1024 tokens over 264 by the ratio) that would halve the
    // prompt at layers 28-29 (3.4% of the rows) keep every block
    let floored = SlimConfig {
        stages: (custom.stages.iter())
            .map(|s| StageConfig {
                fraction: 0.25,
                floor: 1024,
                ..s.clone()
            })
            .collect(),
        ..custom.clone()
    };
    assert!(floored.resolve(30, 2112).is_empty());
}

#[test]
fn preset_floors_keep_short_prompts_whole_in_the_first_stages() {
    let c = SlimConfig {
        keep_ratio: 0.7,
        ..SlimConfig::default()
    };
    // smollm2: 2048 tokens run dense (SMOLLM2_DENSE_TOKENS); 2,560 keep every block through
    // layer 14 (3072-token floor), then the floors of layers 15, 20 and 28 (the ratio's 1792,
    // 896 and 448 tokens are less)
    assert!(c.resolve(30, 2048).is_empty());
    assert_eq!(blocks(&c.resolve(30, 2560)), vec![40, 32, 16, 8]);
    // 1000 tokens: all 16 blocks through layer 20's floor; layer 28 alone would spare 3% of
    // the rows: no schedule
    assert!(c.resolve(30, 1000).is_empty());
    // 4096 tokens: the floor at layer 10 (the ratio's 2867 tokens are less), the ratio's
    // budgets at 15, 20 and 28 (2867, 1434 and 717 tokens)
    assert_eq!(blocks(&c.resolve(30, 4096)), vec![48, 45, 23, 12]);
    // 8192 tokens: the ratio's budgets (5734, 2867, 1434) are above every floor
    assert_eq!(blocks(&c.resolve(30, 8192)), vec![90, 45, 23]);
    // llama3.1-8b: an 8k prompt is whole until layer 20, as in the paper
    assert_eq!(blocks(&c.resolve(32, 8192)), vec![128, 64, 32]);
    // the global floor still applies where it is larger: 3500 tokens (55 blocks) wherever the
    // ratio and the preset's floor give less
    let c = SlimConfig {
        min_keep_tokens: 3500,
        ..c
    };
    assert_eq!(blocks(&c.resolve(30, 8192)), vec![90, 55, 55]);
    assert_eq!(blocks(&c.resolve(30, 4096)), vec![55, 55, 55]);
}

#[test]
fn decode_sets_are_a_share_of_the_kept_blocks_raised_to_the_decode_floor() {
    let decode = |c: &SlimConfig, tokens| -> Vec<usize> {
        (c.resolve(30, tokens).iter())
            .map(|s| s.decode_blocks)
            .collect()
    };
    let c = SlimConfig {
        keep_ratio: 0.6,
        decode_keep: 0.3,
        decode_min_tokens: 1024,
        ..SlimConfig::default()
    };
    // 8192 tokens keep 77/39/20 blocks: 0.3 of 77 is 24 blocks; 0.3 of 39 and of 20 (12, 6)
    // are below the 16-block floor
    assert_eq!(blocks(&c.resolve(30, 8192)), vec![77, 39, 20]);
    assert_eq!(decode(&c, 8192), vec![24, 16, 16]);
    // 2048 tokens are not pruned (SMOLLM2_DENSE_TOKENS)
    assert!(decode(&c, 2048).is_empty());
    // without the floor, the share alone (and the always-kept blocks)
    let c = SlimConfig {
        decode_min_tokens: 0,
        ..c
    };
    assert_eq!(decode(&c, 8192), vec![24, 12, 6]);
    // 4096 tokens keep 48/39/20/10 (the ratio's 2458 tokens over layer 15's floor)
    assert_eq!(decode(&c, 4096), vec![15, 12, 6, 3]);
}

#[test]
fn budgets_never_drop_below_the_always_kept_blocks() {
    // 130 tokens: blocks 0 (sink), 1 and 2 (the last 4 tokens straddle 1 and 2) are forced.
    let c = SlimConfig {
        keep_ratio: 0.01,
        min_keep_tokens: 0,
        ..generic()
    };
    assert_eq!(blocks(&c.resolve(30, 130)), vec![3, 3, 3]);
    assert_eq!(blocks(&c.resolve(30, 64 * 100)), vec![2, 2, 2]);
}

#[test]
fn stages_are_nested_non_increasing() {
    let custom = SlimConfig {
        preset: "custom".into(),
        stages: vec![
            StageConfig {
                layer: 3,
                fraction: 0.9,
                floor: 0,
            },
            StageConfig {
                layer: 6,
                fraction: 0.9,
                floor: 0,
            },
            StageConfig {
                layer: 9,
                fraction: 0.1,
                floor: 0,
            },
        ],
        ..cfg()
    };
    for c in [cfg(), custom] {
        for n_layers in [12, 28, 30, 32] {
            for prompt in [65, 100, 257, 1000, 4097, 8192, 32768, 100_000] {
                let s = c.resolve(n_layers, prompt);
                let n_blocks = prompt.div_ceil(64);
                // empty only where nothing would be pruned (a prompt barely over the floors)
                assert!(
                    !s.is_empty() || prompt < 8192,
                    "{n_layers} layers, {prompt} tokens"
                );
                assert!(s.windows(2).all(|w| w[0].start_layer < w[1].start_layer));
                assert!(
                    s.windows(2).all(|w| w[0].keep_blocks >= w[1].keep_blocks),
                    "{s:?}"
                );
                assert!(s
                    .iter()
                    .all(|st| st.keep_blocks <= n_blocks && st.keep_blocks >= 1));
            }
        }
    }
}

#[test]
fn prompt_within_one_block_has_no_stages() {
    assert!(cfg().resolve(30, 0).is_empty());
    assert!(cfg().resolve(30, 1).is_empty());
    assert!(cfg().resolve(30, 64).is_empty());
    assert_eq!(generic().resolve(30, 65).len(), 3);
}

#[test]
fn disabled_has_no_stages() {
    assert!(SlimConfig {
        enabled: false,
        ..cfg()
    }
    .resolve(30, 32768)
    .is_empty());
}
