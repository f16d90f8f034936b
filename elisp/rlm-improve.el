;;; rlm-improve.el --- Review the rlm daemon's improvement cycle  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; `rlm-improve' asks the daemon to improve a git repository towards a
;; goal (`improve/start'): the root model proposes a diff, the daemon
;; tests it in a disposable copy, and at each decision point this
;; buffer shows the diff (in `diff-mode'), the tests' output and the
;; benchmark change.  Nothing lands without you:
;;
;;   C-c C-c  approve: the daemon applies the diff to the working tree,
;;            unstaged (never a commit); Magit's status shows it
;;   C-c C-k  reject
;;   C-c C-r  reject with feedback typed in the minibuffer: the next
;;            round starts from it
;;
;; `rlm-improve-list' shows the history (`improve/list').

;;; Code:

(require 'cl-lib)
(require 'subr-x)
(require 'diff-mode)
(require 'rlm-client)

(declare-function magit-status-setup-buffer "magit-status" (&optional directory))
(declare-function magit-toplevel "magit-git" (&optional directory))

(defcustom rlm-improve-max-rounds 3
  "Rounds of the improvement cycle before it gives up (max_rounds)."
  :type 'integer
  :group 'rlm)

(defvar rlm-improve-history nil
  "Minibuffer history of goals and commands of `rlm-improve'.")

(defvar-local rlm-improve--job nil
  "The daemon's id of this buffer's improvement cycle.")

(defvar-local rlm-improve--repo nil
  "The repository this buffer's cycle improves.")

(defvar-local rlm-improve--goal nil
  "The goal of this buffer's cycle.")

(defvar-local rlm-improve--state nil
  "The cycle's state: running, awaiting_approval, failed, applied, rejected.")

(defvar-local rlm-improve--decision nil
  "The last decision point (a plist) the daemon returned.")

(defvar-local rlm-improve--phase nil
  "What the daemon said it is doing, while it runs.")

(defvar rlm-improve-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-c") #'rlm-improve-approve)
    (define-key map (kbd "C-c C-k") #'rlm-improve-reject)
    (define-key map (kbd "C-c C-r") #'rlm-improve-reject-with-feedback)
    (define-key map (kbd "g") #'rlm-improve-refresh)
    (define-key map (kbd "q") #'quit-window)
    map)
  "Keymap of `rlm-improve-mode'.")

(define-derived-mode rlm-improve-mode diff-mode "rlm-improve"
  "Major mode reviewing a proposal of the rlm improvement cycle.
Approving applies the diff to the working tree, unstaged; rejecting
with feedback starts the next round from it.

\\{rlm-improve-mode-map}"
  (setq buffer-read-only t)
  (setq-local header-line-format '(:eval (rlm-improve--header)))
  (when (featurep 'magit)
    (rlm-improve--magit-style)))

(defun rlm-improve--magit-style ()
  "Show the diff in Magit's faces, as Magit's own diff buffers do."
  (dolist (pair '((diff-added . magit-diff-added-highlight)
                  (diff-removed . magit-diff-removed-highlight)
                  (diff-context . magit-diff-context-highlight)
                  (diff-hunk-header . magit-diff-hunk-heading-highlight)
                  (diff-file-header . magit-diff-file-heading)
                  (diff-header . magit-diff-file-heading)))
    (when (facep (cdr pair))
      (face-remap-add-relative (car pair) (cdr pair)))))

(defun rlm-improve--header ()
  "Return the header line of a review buffer."
  (concat
   (propertize (format " rlm improve: %s" (rlm-improve--state-text)) 'face
               (pcase rlm-improve--state
                 ("awaiting_approval" 'warning) ((or "failed" "rejected") 'error)
                 ("applied" 'success) (_ 'shadow)))
   (if-let* ((r (plist-get rlm-improve--decision :round))) (format " · round %s" r) "")
   (if (equal rlm-improve--state "awaiting_approval")
       (substitute-command-keys
        "   \\<rlm-improve-mode-map>\\[rlm-improve-approve] approve · \\[rlm-improve-reject] reject · \\[rlm-improve-reject-with-feedback] reject with feedback")
     "")))

(defun rlm-improve--state-text ()
  "Return the state of this buffer's cycle, in words."
  (pcase rlm-improve--state
    ('nil "starting")
    ("running" (or rlm-improve--phase "working"))
    ("awaiting_approval" "awaiting your approval")
    (s (replace-regexp-in-string "_" " " s))))

(defun rlm-improve--event (buffer ev)
  "Show the cycle's event EV (a `query/event' params plist) in BUFFER."
  (when (buffer-live-p buffer)
    (with-current-buffer buffer
      (setq rlm-improve--phase
            (pcase (plist-get ev :kind)
              ("phase" (replace-regexp-in-string "_" " " (format "%s" (plist-get ev :phase))))
              ("proposal" (format "testing the proposal of round %s" (plist-get ev :round)))
              ("test" (format "tests %s" (if (eq (plist-get ev :passed) t) "passed" "failed")))
              (_ rlm-improve--phase)))
      (force-mode-line-update))))

(defun rlm-improve--bench-text (bench)
  "Return the benchmark change BENCH (before, after) as text."
  (let ((before (plist-get bench :before)) (after (plist-get bench :after)))
    (concat (format "%s → %s" (rlm-improve--show before) (rlm-improve--show after))
            (if (and (numberp before) (numberp after) (/= before 0))
                (format " (%+.1f%%)" (* 100 (/ (- after before) (float before))))
              ""))))

(defun rlm-improve--show (v)
  "Return V, a number, string or JSON object, on one line."
  (cond ((stringp v) (string-trim v))
        ((numberp v) (format "%s" v))
        (t (format "%S" v))))

(defun rlm-improve--render (decision)
  "Fill this buffer from DECISION, a result of the improve methods."
  (let ((inhibit-read-only t)
        (tests (plist-get decision :tests))
        (bench (plist-get decision :bench)))
    (setq rlm-improve--decision decision
          rlm-improve--state (plist-get decision :state)
          rlm-improve--phase nil)
    (erase-buffer)
    (let ((label (lambda (s) (propertize s 'font-lock-face 'bold))))
      (insert (funcall label "Goal: ") (or rlm-improve--goal "") "\n"
              (funcall label "Repository: ") (abbreviate-file-name (or rlm-improve--repo "")) "\n"
              (funcall label "State: ") (rlm-improve--state-text)
              (if-let* ((r (plist-get decision :round))) (format ", round %s" r) "") "\n")
      (when tests
        (insert (funcall label "Tests: ")
                (if (eq (plist-get tests :passed) t)
                    (propertize "passed" 'font-lock-face 'success)
                  (propertize "FAILED" 'font-lock-face 'error))
                (if (numberp (plist-get tests :elapsed_s))
                    (format " in %.1f s" (plist-get tests :elapsed_s)) "")
                "\n"))
      (when bench
        (insert (funcall label "Benchmark: ") (rlm-improve--bench-text bench) "\n"))
      (when (plist-get decision :files)
        (insert (funcall label "Applied to the working tree (unstaged): ")
                (mapconcat (lambda (f) (format "%s" f)) (plist-get decision :files) ", ")
                "\n"))
      (when-let* ((summary (plist-get decision :summary)))
        (insert (funcall label "Summary: ") (string-trim summary) "\n"))
      (when (equal rlm-improve--state "awaiting_approval")
        (insert (propertize (substitute-command-keys
                             "\\<rlm-improve-mode-map>\\[rlm-improve-approve] approve   \\[rlm-improve-reject] reject   \\[rlm-improve-reject-with-feedback] reject with feedback\n")
                            'font-lock-face 'shadow)))
      (when (and tests (plist-get tests :output))
        (insert "\n" (funcall label "Test output:") "\n"
                ;; Indented, so that diff-mode never takes it for a hunk.
                (replace-regexp-in-string
                 "^" "    " (string-trim-right (plist-get tests :output)))
                "\n"))
      (insert "\n")
      (when-let* ((diff (plist-get decision :diff)))
        (insert diff)))
    (goto-char (point-min))
    (set-buffer-modified-p nil)
    (force-mode-line-update)))

(defun rlm-improve--call (buffer method params)
  "Send METHOD with PARAMS for BUFFER's cycle; then render the decision."
  (with-current-buffer buffer
    (setq rlm-improve--state "running")
    (force-mode-line-update))
  (jsonrpc-async-request
   (rlm-connection) method params
   :success-fn (lambda (result)
                 (when (buffer-live-p buffer)
                   (with-current-buffer buffer
                     (unless (plist-get result :job)
                       (setq result (plist-put (copy-sequence rlm-improve--decision)
                                               :state (plist-get result :state))))
                     (rlm-improve--render result)
                     (message "rlm improve: %s" (rlm-improve--state-text)))))
   :error-fn (lambda (err)
               (when (buffer-live-p buffer)
                 (with-current-buffer buffer
                   (setq rlm-improve--state "failed"
                         rlm-improve--phase nil)
                   (let ((inhibit-read-only t))
                     (goto-char (point-min))
                     (insert (propertize (format "Error: %s\n" (rlm--error-message err))
                                         'font-lock-face 'error)))
                   (force-mode-line-update)))
               (message "rlm improve: %s" (rlm--error-message err)))
   :timeout nil))

(defun rlm-improve--repo-default ()
  "Return the default repository of `rlm-improve': Magit's, VC's, or here."
  (or (and (fboundp 'magit-toplevel) (magit-toplevel))
      (and (fboundp 'vc-root-dir) (vc-root-dir))
      default-directory))

;;;###autoload
(defun rlm-improve (goal &optional repo test-command bench-command max-rounds)
  "Start an improvement cycle of REPO towards GOAL; return its buffer.
TEST-COMMAND (a shell command) judges each proposal in a disposable
copy; BENCH-COMMAND, when given, runs before and after.  At most
MAX-ROUNDS rounds (default `rlm-improve-max-rounds')."
  (interactive
   (list (read-string "Improve towards goal: " nil 'rlm-improve-history)
         (read-directory-name "Repository: " (rlm-improve--repo-default) nil t)
         (let ((c (read-string "Test command (empty: none): " nil 'rlm-improve-history)))
           (and (not (string-blank-p c)) c))
         (let ((c (read-string "Benchmark command (empty: none): " nil 'rlm-improve-history)))
           (and (not (string-blank-p c)) c))))
  (let* ((repo (expand-file-name (or repo (rlm-improve--repo-default))))
         (job (rlm--new-job-id))
         (buffer (generate-new-buffer (format "*rlm improve: %s*" (rlm--truncate goal 40)))))
    (with-current-buffer buffer
      (rlm-improve-mode)
      (setq rlm-improve--job job rlm-improve--repo repo rlm-improve--goal goal)
      ;; RET (`diff-goto-source') opens the repository's files.
      (when (file-directory-p repo)
        (setq default-directory (file-name-as-directory repo)))
      (let ((inhibit-read-only t))
        (insert (format "Goal: %s\nRepository: %s\n\nThe daemon is working on a proposal...\n"
                        goal (abbreviate-file-name repo))))
      (add-hook 'kill-buffer-hook (lambda () (rlm-listen job nil)) nil t))
    (rlm-listen job (lambda (ev) (rlm-improve--event buffer ev)))
    (rlm-improve--call buffer 'improve/start
                       (rlm--plist :repo (directory-file-name repo) :goal goal :job job
                                   :test_command test-command :bench_command bench-command
                                   :max_rounds (or max-rounds rlm-improve-max-rounds)))
    (pop-to-buffer buffer)
    buffer))

(defun rlm-improve--check (&rest states)
  "Signal unless this is a review buffer whose cycle is in one of STATES."
  (unless (derived-mode-p 'rlm-improve-mode)
    (user-error "Not in an rlm improve buffer"))
  (unless (member rlm-improve--state states)
    (user-error "The cycle is %s, not awaiting approval" (rlm-improve--state-text))))

(defun rlm-improve-approve ()
  "Approve the proposal: apply it to the working tree, unstaged."
  (interactive)
  (rlm-improve--check "awaiting_approval")
  (let ((result (rlm-request 'improve/approve (list :job rlm-improve--job))))
    (rlm-improve--render (append result (rlm--plist-without rlm-improve--decision
                                                            '(:state :files))))
    (message "rlm improve: applied to %s (unstaged, not committed)"
             (mapconcat (lambda (f) (format "%s" f)) (plist-get result :files) ", "))
    ;; Magit's status shows the applied change, unstaged, ready to review.
    (when (and (featurep 'magit) (magit-toplevel rlm-improve--repo))
      (with-demoted-errors "rlm improve: could not show Magit's status: %S"
        (save-selected-window (magit-status-setup-buffer rlm-improve--repo))))
    result))

(defun rlm-improve-reject (&optional feedback)
  "Reject the proposal; with FEEDBACK, start the next round from it."
  (interactive)
  (rlm-improve--check "awaiting_approval" "failed")
  (rlm-improve--call (current-buffer) 'improve/reject
                     (rlm--plist :job rlm-improve--job :feedback feedback)))

(defun rlm-improve-reject-with-feedback (feedback)
  "Reject the proposal, and give the next round FEEDBACK."
  (interactive (progn (rlm-improve--check "awaiting_approval" "failed")
                      (list (read-string "Feedback for the next round: "
                                         nil 'rlm-improve-history))))
  (rlm-improve-reject (if (string-blank-p feedback) nil feedback)))

(defun rlm-improve-refresh ()
  "Show this cycle as the daemon records it (`improve/show')."
  (interactive)
  (unless rlm-improve--job (user-error "Not in an rlm improve buffer"))
  (rlm-improve--render (rlm-request 'improve/show (list :job rlm-improve--job))))

;;;###autoload
(defun rlm-improve-list ()
  "Show the history of improvement cycles (`improve/list')."
  (interactive)
  (let* ((res (rlm-request 'improve/list))
         (cycles (append (if (plist-get res :cycles) (plist-get res :cycles) res) nil))
         (buf (get-buffer-create "*rlm improve history*")))
    (with-current-buffer buf
      (let ((inhibit-read-only t))
        (erase-buffer)
        (special-mode)
        (dolist (c cycles)
          (let ((job (plist-get c :job)))
            (insert-text-button (format "%s" job)
                                'action (lambda (_) (rlm-improve-show job))
                                'follow-link t)
            (insert (format "  %-18s round %-3s %s\n" (or (plist-get c :state) "")
                            (or (plist-get c :round) "") (or (plist-get c :goal) "")))))
        (goto-char (point-min))))
    (display-buffer buf)
    buf))

(defun rlm-improve-show (job)
  "Show the improvement cycle JOB in a review buffer."
  (let* ((decision (rlm-request 'improve/show (list :job job)))
         (buffer (get-buffer-create (format "*rlm improve: %s*" job))))
    (with-current-buffer buffer
      (rlm-improve-mode)
      (setq rlm-improve--job job
            rlm-improve--repo (plist-get decision :repo)
            rlm-improve--goal (plist-get decision :goal))
      (when (and (stringp rlm-improve--repo) (file-directory-p rlm-improve--repo))
        (setq default-directory (file-name-as-directory rlm-improve--repo)))
      (rlm-improve--render decision))
    (pop-to-buffer buffer)
    buffer))

(provide 'rlm-improve)
;;; rlm-improve.el ends here
