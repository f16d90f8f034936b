;;; rlm-magit-tests.el --- ERT tests of rlm-magit.el on a real repository  -*- lexical-binding: t; -*-

;;; Commentary:

;; See rlm-tests.el for the set-up: the scripted model answers reviews
;; ("Review this diff") with a finding at src/app.py:2.

;;; Code:

(require 'ert)
(require 'rlm-tests)

(defun rlm-test-git (&rest args)
  "Run git with ARGS in `default-directory'; fail the test on errors."
  (with-temp-buffer
    (let ((status (apply #'process-file "git" nil t nil args)))
      (unless (eql status 0)
        (error "git %s failed: %s" (string-join args " ") (buffer-string))))))

(defun rlm-test-write (file text)
  "Write TEXT to FILE."
  (make-directory (file-name-directory (expand-file-name file)) t)
  (with-temp-file file (insert text)))

(ert-deftest rlm-test-magit-review-of-staged-changes ()
  (unless (require 'magit nil t) (ert-skip "Magit is not installed"))
  (rlm-test-with-daemon
    (require 'rlm-magit)
    (let* ((dir (file-name-as-directory (make-temp-file "rlmgit" t)))
           (default-directory dir)
           (process-environment
            (append '("GIT_AUTHOR_NAME=t" "GIT_AUTHOR_EMAIL=t@example.org"
                      "GIT_COMMITTER_NAME=t" "GIT_COMMITTER_EMAIL=t@example.org"
                      "GIT_CONFIG_NOSYSTEM=1")
                    process-environment)))
      (unwind-protect
          (progn
            (rlm-test-git "init" "-q")
            (rlm-test-write "src/app.py" "def total(xs):\n    return sum(xs)\n")
            (rlm-test-git "add" ".")
            (rlm-test-git "commit" "-q" "-m" "first")
            (rlm-test-write "src/app.py" "def total(xs):\n    return sum(x for x in xs)\n\ndef count(xs):\n    return len(xs)\n")
            (rlm-test-git "add" "src/app.py")
            (rlm-test-write "notes.txt" "unstaged and untracked\n")
            ;; The suffix is in the magit-diff transient.
            (should (transient-get-suffix 'magit-diff "R"))
            (with-current-buffer (magit-status-setup-buffer dir)
              (goto-char (point-min))
              (should (equal (car (rlm-magit-diff-target)) "staged changes"))
              (let ((job (rlm-test-finish (rlm-magit-review))))
                (should (eq (rlm-job-state job) 'done))
                (should (string-match-p "src/app.py:2" (rlm-job-answer job)))
                ;; The daemon got the staged diff.
                (let ((sent (rlm-test-context-text (rlm-job-context job))))
                  (should (string-match-p "^\\+    return sum(x for x in xs)$" sent))
                  (should-not (string-match-p "notes.txt" sent)))
                (with-current-buffer (rlm-job-buffer job)
                  (goto-char (point-min))
                  (search-forward "src/app.py:2")
                  (let ((button (button-at (match-beginning 0))))
                    (should button)
                    (save-window-excursion
                      (button-activate button)
                      (should (derived-mode-p 'diff-mode))
                      (should (string-prefix-p "*rlm diff: staged changes" (buffer-name)))
                      (should (looking-at-p "\\+    return sum(x for x in xs)"))))))
              ;; On the staged file: that file's staged changes.
              (goto-char (point-min))
              (should (re-search-forward "^modified +src/app.py" nil t))
              (beginning-of-line)
              (should (equal (car (rlm-magit-diff-target)) "staged changes in src/app.py"))
              ;; In a diff buffer: the diff it shows.
              (with-current-buffer (magit-diff-setup-buffer nil "--cached" nil nil)
                (pcase-let ((`(,desc . ,args) (rlm-magit-diff-target)))
                  (should (equal desc "diff --cached"))
                  (with-current-buffer (rlm-magit-diff-buffer desc args)
                    (should (string-match-p "^\\+    return len(xs)$" (buffer-string))))))
              ;; On a commit: that commit's diff.
              (rlm-test-git "commit" "-q" "-m" "second")
              (magit-refresh)
              (goto-char (point-min))
              (should (re-search-forward "^[0-9a-f]\\{7,\\} .*second$" nil t))
              (should (string-prefix-p "commit " (car (rlm-magit-diff-target))))
              (should (member "show" (cdr (rlm-magit-diff-target))))))
        (delete-directory dir t)))))

(provide 'rlm-magit-tests)
;;; rlm-magit-tests.el ends here
