"""What a snapshot build's build_args become: the checks, the builder's steps,
the mirrors written into the guest and the builder's egress."""

from __future__ import annotations

from kiln.config import Settings
from kiln.services.snapshots.build_disk import GIB, check_disk_size, filesystem_step
from kiln.services.snapshots.build_plan import BuildPlan, check_build_args, egress_policy, repository_name, steps


def problems_of(args: dict, packages: tuple[str, ...] = ()) -> dict[str, str]:
    _, problems = check_build_args(args, packages, "default")
    return {str(problem.loc[-1]): problem.msg for problem in problems}


def test_every_key_the_sdk_sends_is_taken() -> None:
    plan, problems = check_build_args(
        {
            "extra_apt_packages": "jq, curl",
            "extra_pip_packages": ["requests==2.31", "rich[jupyter]>=13"],
            "extra_npm_packages": "left-pad @scope/pkg@1.2.3",
            "git_clone_url": "https://example.com/org/app.git",
            "git_clone_branch": "main",
            "post_build_cmd": "make",
            "envs": {"A": "1"},
            "template_app_cmd": "python3 -m http.server",
            "template_app_cwd": "/app",
            "disk_size_gb": 8,  # build_disk's
        },
        ("nodejs", "npm"),
        "node",
    )
    assert problems == []
    assert plan.apt == ("jq", "curl") and plan.npm == ("left-pad", "@scope/pkg@1.2.3")
    assert plan.pip == ("requests==2.31", "rich[jupyter]>=13")
    assert "unknown" in problems_of({"free_space_mb": 1})["free_space_mb"]


def test_bad_values_are_named() -> None:
    found = problems_of(
        {
            "extra_apt_packages": ["-oAPT::x=y", "ok"],
            "extra_pip_packages": 3,
            "extra_npm_packages": ["left-pad"],
            "git_clone_url": "file:///etc",
            "envs": {"1X": "y"},
            "template_app_cwd": "/x",
        }
    )
    assert set(found) == {
        "extra_apt_packages", "extra_pip_packages", "extra_npm_packages", "git_clone_url", "envs", "template_app_cwd"
    }  # fmt: skip
    assert "'-oAPT::x=y'" in found["extra_apt_packages"]
    assert "has no npm" in found["extra_npm_packages"]


def test_mirrors_go_into_the_guest_and_are_all_the_builder_reaches() -> None:
    settings = Settings(
        apt_mirror="http://mirror.test/apt", apt_mirror_dist="./", apt_mirror_trusted=True,
        pip_index_url="http://mirror.test/pip/simple/", npm_registry="http://npm.test/",
    )  # fmt: skip
    plan = BuildPlan(apt=("hello",), pip=("probe",), npm=("probe",))
    shells = "\n".join(step.shell for step in steps(plan, settings))
    assert "'deb [trusted=yes] http://mirror.test/apt ./\n'" in shells
    assert "trusted-host = mirror.test" in shells and "index-url = http://mirror.test/pip/simple/" in shells
    assert "registry=http://npm.test/" in shells and "--registry=http://npm.test/" in shells
    assert egress_policy(plan, settings) == {
        "allow_package_managers": False, "allowed_cidrs": [],
        "allowed_domains": ["mirror.test", "npm.test"], "allow_http": True, "allow_https": True,
    }  # fmt: skip


def test_without_mirrors_the_builder_reaches_the_package_manager_group() -> None:
    settings = Settings()
    assert egress_policy(BuildPlan(pip=("x",)), settings) == {"allow_package_managers": True, "allowed_cidrs": []}
    assert egress_policy(BuildPlan(post_build_cmd="true"), settings) is None
    git = egress_policy(BuildPlan(git_url="https://10.0.0.1/r.git"), settings)
    assert git == {"allow_package_managers": False, "allowed_cidrs": ["10.0.0.1/32"]}
    assert repository_name("https://h/org/app.git") == "app" and repository_name("https://h/") == "repository"


def test_disk_size_gb_is_a_whole_number_of_gib_from_the_image_disk_to_the_limit() -> None:
    image = int(1.1 * GIB)
    assert check_disk_size({}, image, 32) == (None, [])
    assert check_disk_size({"disk_size_gb": 2}, image, 32) == (2 * GIB, [])
    assert check_disk_size({"disk_size_gb": 32}, image, 32) == (32 * GIB, [])
    refused = {
        "smaller than the image's disk": (1, "at least the image's disk (1.10 GiB)"),
        "zero": (0, "between 1 and 32 GiB (KILN_MAX_BUILD_DISK_GB)"),
        "negative": (-4, "between 1 and 32 GiB"),
        "over the server's limit": (33, "between 1 and 32 GiB"),
        "not a whole number": (2.5, "whole number of GiB"),
        "a string": ("4", "whole number of GiB"),
        "a boolean": (True, "whole number of GiB"),
    }
    for case, (value, message) in refused.items():
        size, problems = check_disk_size({"disk_size_gb": value}, image, 32)
        assert size is None and [p.loc for p in problems] == [("build_args", "disk_size_gb")], case
        assert message in problems[0].msg, (case, problems[0].msg)


def test_the_guest_grows_its_file_system_once_it_sees_the_bigger_disk() -> None:
    step = filesystem_step(4 * GIB)
    assert step.title == "grow the root file system to 4 GiB"
    assert f"-lt {4 * GIB} ]" in step.shell and "/sys/block/vda/size" in step.shell
    assert step.shell.endswith("resize2fs /dev/vda && df -h /")
